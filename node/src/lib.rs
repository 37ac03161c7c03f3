//! The rsyncfs node: the daemon that keeps its mount equal to every peer's.
//!
//! [`runtime::run`] is the daemon (`rsyncfs-node up`); the other modules are its parts: the
//! node's [`identity`] and the [`tls`] that pins peers by it, the QUIC [`transport`] with its
//! content transfers ([`delta`]), the redb [`store`] behind the engine, the backing tree as the
//! node touches it ([`files`]), the trusted [`peers`] and the [`control`] socket the commands use.
//! See docs/ARCHITECTURE.md for the data path of one write.

pub mod control;
pub mod delta;
pub mod files;
pub mod identity;
pub mod peers;
pub mod runtime;
pub mod store;
pub mod tls;
pub mod transport;

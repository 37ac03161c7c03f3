//! The rsyncfs node: the daemon that keeps its mount equal to every peer's, and its commands.
//!
//! Laid out by concept, dependencies pointing one way (`cli` → `daemon` → the rest):
//! - [`daemon`]: `rsyncfs-node up`: startup, the engine loop, the workers, group commits and
//!   status; the only part that wires real I/O to the engine;
//! - [`net`]: the QUIC endpoint and links ([`net::tls`] pins peers by id), framing, joins, and
//!   content transfers ([`net::content`]);
//! - [`tree`]: the backing directory as the node touches it: observe, apply, staging;
//! - [`store`]: the engine's store on redb;
//! - [`trust`]: the node's identity and the peers it trusts;
//! - [`control`]: the control socket's typed protocol, its server and client;
//! - [`cli`]: the command line.
//!
//! See docs/ARCHITECTURE.md for the data path of one write and the driver contract.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod net;
pub mod store;
pub mod tree;
pub mod trust;

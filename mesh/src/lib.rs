//! The rsyncfs replication protocol, without I/O.
//!
//! - [`engine::Engine`]: one node's master and slave replicators as a state machine. Inputs in
//!   ([`engine::Input`]), outputs out ([`engine::Output`]), time passed in, no sockets, files or
//!   clocks. The daemon drives it with real I/O; the simulator drives many of them at once.
//! - [`wire`]: the messages replicators exchange, their postcard encoding with a protocol
//!   version, and their limits; [`wire::decode`] checks everything a peer sends.
//! - [`store::Store`]: what the engine persists, as a trait; [`store::MemStore`] keeps it in
//!   memory with explicit group commits (the simulator crashes it).
//! - [`path::RelPath`]: a checked relative path; the only kind of path the engine handles.
//! - [`ignore::IgnoreRules`]: the tree's `.rsyncfsignore` and the default patterns, which the
//!   engine consults before it ships or applies a path.

pub mod engine;
pub mod ignore;
pub mod path;
pub mod store;
pub mod wire;

pub use engine::{Config, Engine, Input, Mode, Output};
pub use path::RelPath;
pub use store::{Entry, MemStore, Store};

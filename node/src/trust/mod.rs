//! Who this node is and whom it trusts: its [`identity`] (key, certificate, node id) and the
//! [`peers`] it trusts, with their addresses.

pub mod identity;
pub mod peers;

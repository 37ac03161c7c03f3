//! The FUSE change logger of rsyncfs: a passthrough filesystem over a backing directory that
//! reports every change. Not built yet: this crate is a placeholder that its own issue fills.

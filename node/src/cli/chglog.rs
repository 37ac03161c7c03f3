//! `rsyncfs-node chglog`: the running node's changed paths, as a stream or, with `--batch`, in
//! lists, each written out or given to a command (a loop of rsync runs: the 2005 proposal's
//! pipeline, which a stream cannot feed, since rsync reads its whole list before it copies).

use super::fail;
use crate::control::client::{self, Changed};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// Paths one list holds at most; past that it says `.` (the whole tree) instead of more.
const LIST_PATHS_MAX: usize = 1_000_000;
/// Changes queued between the thread reading the daemon and the lists; while it is full the
/// daemon's own queue fills, and the daemon then reports a loss.
const QUEUED_MAX: usize = 65_536;
/// The wait before a failed list goes again, doubled at each failure in a row up to the most.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// What a list holds where some changes were not listed: the tree's root.
const EVERYTHING: &[u8] = b".";

/// Writes each changed path with `sep` after it, until the daemon stops.
pub(super) fn stream(state: &Path, sep: u8) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let result = client::chglog(state, |changed| {
        let path = match changed {
            Changed::Path(p) => p,
            Changed::Lost => {
                warn_lost();
                EVERYTHING
            }
        };
        out.write_all(path)
            .and_then(|_| out.write_all(&[sep]))
            .and_then(|_| out.flush())
            .is_ok()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.to_string()),
    }
}

fn warn_lost() {
    eprintln!(
        "rsyncfs-node: some changed paths were not listed (this reader fell behind): \
         `.` stands for them; sync the whole tree"
    );
}

/// One list being gathered: its paths in order, and whether some were left out.
#[derive(Default)]
struct List {
    paths: BTreeSet<Vec<u8>>,
    lost: bool,
}

impl List {
    fn add(&mut self, path: Vec<u8>) {
        if self.paths.len() < LIST_PATHS_MAX {
            self.paths.insert(path);
        } else {
            self.lost = true;
        }
    }

    /// The list's bytes: each path and `sep`, `.` first where paths were left out.
    fn bytes(&self, sep: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let everything = self.lost.then_some(EVERYTHING);
        for path in everything
            .into_iter()
            .chain(self.paths.iter().map(Vec::as_slice))
        {
            out.extend_from_slice(path);
            out.push(sep);
        }
        out
    }

    fn len(&self) -> usize {
        self.paths.len() + usize::from(self.lost)
    }
}

enum Item {
    Path(Vec<u8>),
    Lost,
    /// The stream ended: the daemon stopped, or could not be reached.
    End(Result<(), String>),
}

/// Why a list was not handed on.
enum NotHanded {
    /// Worth trying again (the command failed).
    Again(String),
    /// Not (the command cannot be run at all).
    Never(String),
}

/// Gathers changed paths for `every` after the first of a list, then hands the list on: to a
/// run of `command` on its standard input, or to standard output followed by an empty entry.
pub(super) fn batches(state: &Path, sep: u8, every: Duration, command: &[String]) -> ExitCode {
    let (tx, rx) = mpsc::sync_channel::<Item>(QUEUED_MAX);
    let reader_state = state.to_path_buf();
    let spawned = std::thread::Builder::new()
        .name("chglog-reader".into())
        .spawn(move || {
            let result = client::chglog(&reader_state, |changed| {
                let item = match changed {
                    Changed::Path(p) => Item::Path(p.to_vec()),
                    Changed::Lost => Item::Lost,
                };
                tx.send(item).is_ok()
            });
            let _ = tx.send(Item::End(result.map_err(|e| e.to_string())));
        });
    if let Err(e) = spawned {
        return fail(format!("cannot start a thread: {e}"));
    }
    let mut list = List::default();
    // When the list being gathered is handed on; none while it is empty.
    let mut due: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let item = match due {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match item {
            Ok(Item::Path(path)) => {
                list.add(path);
                due.get_or_insert_with(|| Instant::now() + every);
            }
            Ok(Item::Lost) => {
                warn_lost();
                list.lost = true;
                due.get_or_insert_with(|| Instant::now() + every);
            }
            Err(RecvTimeoutError::Timeout) => match hand_on(&list, sep, command) {
                Ok(()) => {
                    list = List::default();
                    due = None;
                    backoff = BACKOFF_MIN;
                }
                Err(NotHanded::Again(why)) => {
                    let wait = backoff.max(every);
                    eprintln!(
                        "rsyncfs-node: {why}; its {} paths go again with the next list, in {}",
                        list.len(),
                        humantime::format_duration(wait)
                    );
                    due = Some(Instant::now() + wait);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(NotHanded::Never(why)) => return fail(why),
            },
            Ok(Item::End(result)) => return ended(&list, sep, command, result),
            Err(RecvTimeoutError::Disconnected) => {
                return ended(&list, sep, command, Err("the reader stopped".into()))
            }
        }
    }
}

/// The stream ended: the list gathered so far is handed on once, and the end is reported (a
/// pipeline that stops must say so).
fn ended(list: &List, sep: u8, command: &[String], result: Result<(), String>) -> ExitCode {
    if list.len() > 0 {
        if let Err(NotHanded::Again(why) | NotHanded::Never(why)) = hand_on(list, sep, command) {
            eprintln!(
                "rsyncfs-node: {why}; {} changed paths were not handed on",
                list.len()
            );
        }
    }
    match result {
        Ok(()) => fail("the daemon's change stream ended (the node stopped)".into()),
        Err(e) => fail(e),
    }
}

fn hand_on(list: &List, sep: u8, command: &[String]) -> Result<(), NotHanded> {
    let mut bytes = list.bytes(sep);
    let Some((program, args)) = command.split_first() else {
        // The list and an empty entry after it.
        bytes.push(sep);
        let mut out = std::io::stdout().lock();
        return out
            .write_all(&bytes)
            .and_then(|_| out.flush())
            .map_err(|e| NotHanded::Never(format!("writing the list: {e}")));
    };
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| NotHanded::Never(format!("cannot run `{program}`: {e}")))?;
    let written = child
        .stdin
        .take()
        .expect("piped")
        .write_all(&bytes)
        .map_err(|e| format!("`{program}` did not read its list: {e}"));
    let status = child
        .wait()
        .map_err(|e| NotHanded::Again(format!("waiting for `{program}`: {e}")))?;
    let vanished = is_rsync(program) && status.code() == Some(RSYNC_VANISHED);
    if !(status.success() || vanished) {
        return Err(NotHanded::Again(format!("`{program}` {status}")));
    }
    written.map_err(NotHanded::Again)
}

/// rsync's exit status when some files vanished before it could copy them: done, for a list of
/// changes, since a path that vanished is listed again (as removed) in a later list. Counted as
/// a failure, the same list would fail forever.
const RSYNC_VANISHED: i32 = 24;

fn is_rsync(program: &str) -> bool {
    Path::new(program).file_name() == Some(std::ffi::OsStr::new("rsync"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_its_paths_once_each_in_order_with_the_root_first_where_some_were_lost() {
        let mut list = List::default();
        for p in ["b", "a/x", "b", "a"] {
            list.add(p.as_bytes().to_vec());
        }
        assert_eq!(list.bytes(0), b"a\0a/x\0b\0");
        assert_eq!(list.len(), 3);
        list.lost = true;
        assert_eq!(list.bytes(b'\n'), b".\na\na/x\nb\n");
        assert_eq!(list.len(), 4);
    }
}

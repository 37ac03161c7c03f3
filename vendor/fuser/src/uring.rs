//! FUSE over io_uring (Linux 6.14 and later; the `fuse` module's `enable_uring` parameter).
//!
//! Added to fuser for rsyncfs (see PATCHED.md). The kernel keeps a queue of requests per CPU
//! and puts a request in the queue of the CPU that made it; each queue is served by ring
//! entries the daemon registers. Here every entry has its own worker thread, pinned to the
//! queue's CPU, with its own small io_uring: the kernel hands a request to an idle entry of the
//! caller's CPU, the worker is woken on that CPU (no cross-CPU wake-up, which is most of a
//! round trip's cost on virtual machines), and its reply goes back in the same buffers with the
//! fetch of the next request (`COMMIT_AND_FETCH`, one system call).
//!
//! With one entry per worker, a worker busy on a slow request (an fsync) holds only its own
//! entry: the kernel gives the next request of that CPU to another idle worker of the queue.
//!
//! Forgets, interrupts and notifications still travel over `/dev/fuse`; the classic loop keeps
//! running for them.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::OnceLock;
use std::thread::ThreadId;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::dev_fuse::DevFuse;
use crate::ll::Operation;
use crate::passthrough::BackingId;
use crate::reply::ReplyEmpty;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// `struct fuse_uring_req_header`: the in/out header (128 bytes), the operation's own header
/// (128) and `struct fuse_uring_ent_in_out` (32).
const HEADER: usize = 288;
const OP_IN: usize = 128;
const ENT_IN_OUT: usize = 256;
const ENT_COMMIT_ID: usize = ENT_IN_OUT + 8;
const ENT_PAYLOAD_SZ: usize = ENT_IN_OUT + 16;
/// Submission queue entries per worker: a registration or a commit at a time, and room.
const RING_ENTRIES: u32 = 4;
/// The kernel's `FUSE_MIN_READ_BUFFER`.
const MIN_PAYLOAD: usize = 8192;

/// The number of queues the kernel makes: one per possible CPU.
fn possible_cpus() -> usize {
    // A list of ranges, as "0-3,8-11"; the kernel's count is what matters.
    let count = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .map(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| {
                    let mut ends = r.split('-').map(|n| n.trim().parse::<usize>());
                    match (ends.next(), ends.next()) {
                        (Some(Ok(_)), None) => Some(1),
                        (Some(Ok(a)), Some(Ok(b))) if b >= a => Some(b - a + 1),
                        _ => None,
                    }
                })
                .sum::<usize>()
        })
        .unwrap_or(0);
    if count > 0 {
        count
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The payload buffer a ring entry needs for the negotiated sizes: at least the kernel's
/// `max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE)`.
pub(crate) fn payload_len(max_write: u32, max_pages: u16) -> usize {
    let page = page_size::get();
    let need = MIN_PAYLOAD
        .max(max_write as usize)
        .max(usize::from(max_pages) * page);
    need.div_ceil(page) * page
}

/// One ring entry with its worker's io_uring. The buffers belong to the kernel from the
/// registration until the entry's command completes with an error (the connection ended);
/// between a request's arrival and its reply they belong to the one request being served.
pub(crate) struct Worker {
    qid: u16,
    dev: Arc<DevFuse>,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    /// Serialises pushes to the submission queue (replies may come from other threads).
    sq: Mutex<()>,
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
    iov: Box<[libc::iovec; 2]>,
    owner: OnceLock<ThreadId>,
    /// Whether the kernel may still write the buffers (then they are leaked, not freed).
    kernel_holds: std::sync::atomic::AtomicBool,
}

// SAFETY: the raw buffer pointers are only written by the thread serving the entry's current
// request (or the one replying to it), which the protocol makes exclusive; the ring's
// submission side is serialised by `sq` and its completion side is read by the owner only.
unsafe impl Send for Worker {}
// SAFETY: as above.
unsafe impl Sync for Worker {}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("qid", &self.qid).finish()
    }
}

impl Worker {
    fn new(qid: u16, dev: Arc<DevFuse>, payload_len: usize) -> io::Result<Worker> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let header = Box::into_raw(vec![0u8; HEADER].into_boxed_slice()).cast::<u8>();
        // Zeroed pages from the allocator are mapped lazily: a large payload costs memory only
        // where requests have written it.
        let payload = Box::into_raw(vec![0u8; payload_len].into_boxed_slice()).cast::<u8>();
        let iov = Box::new([
            libc::iovec {
                iov_base: header.cast(),
                iov_len: HEADER,
            },
            libc::iovec {
                iov_base: payload.cast(),
                iov_len: payload_len,
            },
        ]);
        Ok(Worker {
            qid,
            dev,
            ring,
            sq: Mutex::new(()),
            header,
            payload,
            payload_len,
            iov,
            owner: OnceLock::new(),
            kernel_holds: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Workers for every queue, `per_queue` each, or the first error (then none).
    pub(crate) fn create_all(
        dev: &Arc<DevFuse>,
        payload_len: usize,
        per_queue: usize,
    ) -> io::Result<Vec<Arc<Worker>>> {
        let queues = possible_cpus();
        let qids = u16::try_from(queues).map_err(|_| io::Error::other("too many CPUs"))?;
        let mut all = Vec::with_capacity(queues * per_queue);
        for qid in 0..qids {
            for _ in 0..per_queue.max(1) {
                all.push(Arc::new(Worker::new(qid, Arc::clone(dev), payload_len)?));
            }
        }
        Ok(all)
    }

    fn command(&self, op: u32, commit_id: u64, with_buffers: bool) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req: flags (8 bytes), commit_id (8), qid (2), padding.
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut b = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), op).cmd(cmd);
        if with_buffers {
            b = b.addr(Some(self.iov.as_ptr() as u64));
        }
        let entry = b.build().user_data(u64::from(self.qid));
        if !with_buffers {
            return entry;
        }
        // REGISTER reads the iovec count from the SQE's `len` (offset 24 of struct
        // io_uring_sqe), which io-uring 0.7 has no setter for.
        // SAFETY: Entry128 is repr(C) over the 128 bytes of the SQE; only `len` changes.
        unsafe {
            let mut raw: [u8; 128] = std::mem::transmute(entry);
            raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
            std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
        }
    }

    fn push(&self, entry: &squeue::Entry128) -> io::Result<()> {
        let _sq = self.sq.lock();
        // SAFETY: pushes are serialised by `sq`; the entry's buffers outlive the command (they
        // are freed only after the kernel has completed it, or leaked).
        unsafe {
            self.ring
                .submission_shared()
                .push(entry)
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        if self.owner.get() != Some(&std::thread::current().id()) {
            // The owner may be asleep in io_uring_enter: submit for it.
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Copies a reply (the out header, then its payload) into the entry and commits it with
    /// the fetch of the next request.
    fn commit(&self, commit_id: u64, data: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = data.iter().map(|b| b.len()).sum();
        let mut out = [0u8; OUT_HEADER];
        let mut at = 0;
        let mut too_big = total < OUT_HEADER || total - OUT_HEADER > self.payload_len;
        if !too_big {
            for b in data {
                let mut b: &[u8] = b;
                if at < OUT_HEADER {
                    let n = b.len().min(OUT_HEADER - at);
                    out[at..at + n].copy_from_slice(&b[..n]);
                    at += n;
                    b = &b[n..];
                }
                if !b.is_empty() {
                    let off = at - OUT_HEADER;
                    if off + b.len() > self.payload_len {
                        too_big = true;
                        break;
                    }
                    // SAFETY: within the payload buffer (checked above), which this request
                    // owns until the commit below.
                    unsafe {
                        std::ptr::copy_nonoverlapping(b.as_ptr(), self.payload.add(off), b.len())
                    };
                    at += b.len();
                }
            }
        }
        let payload_sz = if too_big {
            warn!("FUSE reply of {total} bytes does not fit the ring entry; sending EIO");
            // Keep the unique id the kernel matches the reply by, answer EIO.
            // SAFETY: the header buffer is HEADER bytes long and owned by this request.
            let unique = unsafe { std::slice::from_raw_parts(self.header.add(8), 8) };
            out[8..16].copy_from_slice(unique);
            out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
            out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
            0u32
        } else {
            (at - OUT_HEADER) as u32
        };
        // SAFETY: offsets within the HEADER-byte header buffer this request owns.
        unsafe {
            std::ptr::copy_nonoverlapping(out.as_ptr(), self.header, OUT_HEADER);
            std::ptr::copy_nonoverlapping(
                payload_sz.to_ne_bytes().as_ptr(),
                self.header.add(ENT_PAYLOAD_SZ),
                4,
            );
        }
        self.push(&self.command(CMD_COMMIT_AND_FETCH, commit_id, false))
    }

    /// Copies the request the kernel put in the entry into `buf` as `/dev/fuse` would have
    /// delivered it (the in header, the operation's header, the rest), and returns its length
    /// and the id its reply must commit.
    fn take_request(&self, buf: &mut [u8]) -> (u64, Option<usize>) {
        let mut h = [0u8; HEADER];
        // SAFETY: the kernel wrote the header before completing the command; it is ours now.
        unsafe { std::ptr::copy_nonoverlapping(self.header, h.as_mut_ptr(), HEADER) };
        let word = |at: usize| u32::from_ne_bytes(h[at..at + 4].try_into().unwrap()) as usize;
        let len = word(0);
        let payload_sz = word(ENT_PAYLOAD_SZ);
        let commit_id = u64::from_ne_bytes(h[ENT_COMMIT_ID..ENT_COMMIT_ID + 8].try_into().unwrap());
        let Some(op_in) = len.checked_sub(IN_HEADER + payload_sz) else {
            return (commit_id, None);
        };
        if op_in > OP_IN || payload_sz > self.payload_len || len > buf.len() {
            return (commit_id, None);
        }
        buf[..IN_HEADER].copy_from_slice(&h[..IN_HEADER]);
        buf[IN_HEADER..IN_HEADER + op_in].copy_from_slice(&h[OP_IN..OP_IN + op_in]);
        // SAFETY: payload_sz is within the payload buffer (checked), which the kernel filled.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.payload,
                buf[IN_HEADER + op_in..].as_mut_ptr(),
                payload_sz,
            )
        };
        (commit_id, Some(len))
    }

    /// Answers the request in the entry with an error without looking further into it.
    fn refuse(&self, commit_id: u64, errno: i32) -> io::Result<()> {
        let mut out = [0u8; OUT_HEADER];
        out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
        out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
        // SAFETY: the header buffer is HEADER bytes long and owned by this request.
        let unique = unsafe { std::slice::from_raw_parts(self.header.add(8), 8) };
        out[8..16].copy_from_slice(unique);
        self.commit(commit_id, &[IoSlice::new(&out)])
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.kernel_holds.load(std::sync::atomic::Ordering::Acquire) {
            // The kernel may still write into them: leaking is the safe choice.
            return;
        }
        // SAFETY: allocated in `new` with these lengths; nobody else holds them now.
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.header,
                HEADER,
            )));
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.payload,
                self.payload_len,
            )));
        }
    }
}

/// Where a request that came through a ring entry is answered.
#[derive(Debug, Clone)]
pub(crate) struct RingReply {
    worker: Arc<Worker>,
    commit_id: u64,
}

impl RingReply {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        self.worker.commit(self.commit_id, data)
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        BackingId::create(&self.worker.dev, fd)
    }

    /// # Safety
    /// As `ChannelSender::wrap_backing`.
    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        unsafe { BackingId::wrap_raw(&self.worker.dev, id) }
    }
}

fn pin_to(cpu: usize) -> bool {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).is_ok()
        && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_ok()
}

/// A worker's loop: pins itself to its queue's CPU, registers its entry, serves what arrives
/// until the connection ends.
pub(crate) fn serve<FS: Filesystem>(
    worker: Arc<Worker>,
    se: &SessionEventLoop<FS>,
) -> io::Result<()> {
    if !pin_to(usize::from(worker.qid)) {
        debug!("ring worker of queue {} runs unpinned", worker.qid);
    }
    let _ = worker.owner.set(std::thread::current().id());
    worker
        .kernel_holds
        .store(true, std::sync::atomic::Ordering::Release);
    worker.push(&worker.command(CMD_REGISTER, 0, true))?;
    // Aligned for the request parser: a whole request as /dev/fuse would deliver it.
    let words = (IN_HEADER + OP_IN + worker.payload_len).div_ceil(8);
    let mut storage = vec![0u64; words];
    // SAFETY: a u64 buffer viewed as bytes (alignment 8 >= 1, same length in bytes).
    let buf = unsafe { std::slice::from_raw_parts_mut(storage.as_mut_ptr().cast::<u8>(), words * 8) };
    loop {
        match worker.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        // One entry, so at most one completion at a time, taken (and the queue's head moved)
        // before the request is served.
        loop {
            // SAFETY: only this thread (the owner) reads the completion queue.
            let next = unsafe { worker.ring.completion_shared() }
                .next()
                .map(|c| c.result());
            let Some(res) = next else { break };
            if res < 0 {
                // The connection ended (or the kernel refused the entry): the command is
                // complete, so the kernel no longer holds the buffers.
                worker
                    .kernel_holds
                    .store(false, std::sync::atomic::Ordering::Release);
                if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                    warn!(
                        "FUSE ring entry of queue {} ended: {}",
                        worker.qid,
                        io::Error::from_raw_os_error(-res)
                    );
                }
                return Ok(());
            }
            let (commit_id, len) = worker.take_request(buf);
            let Some(len) = len else {
                warn!("malformed request in a FUSE ring entry of queue {}: answered EIO", worker.qid);
                worker.refuse(commit_id, libc::EIO)?;
                continue;
            };
            let reply = RingReply {
                worker: Arc::clone(&worker),
                commit_id,
            };
            match RequestWithSender::new_ring(se.ch.sender(), reply, &buf[..len]) {
                Some(req) => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<ReplyEmpty>().ok();
                        return Ok(());
                    }
                    req.dispatch(se);
                }
                None => {
                    warn!("invalid request in a FUSE ring entry of queue {}: answered EIO", worker.qid);
                    worker.refuse(commit_id, libc::EIO)?;
                }
            }
        }
    }
}

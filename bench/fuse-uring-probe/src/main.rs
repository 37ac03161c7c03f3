//! What one FUSE round trip costs on this machine over the classic `/dev/fuse` read/write loop
//! and over FUSE-over-io_uring (Linux 6.14+, a queue per CPU), measured with the same minimal
//! in-memory filesystem, so that issue 13 can decide whether the logger should move to io_uring
//! before anyone builds it into fuser.
//!
//! The program mounts its own filesystem, serves it on threads of its own, and times from its
//! main thread (a program like any other, not pinned) two loops:
//! - `stat` of existing names with an entry timeout of zero, so that each one is exactly one
//!   LOOKUP round trip;
//! - `open(O_CREAT)` and `close` of new names: a LOOKUP that misses, a CREATE, a FLUSH and a
//!   RELEASE (the last one is not waited for).
//!
//! Usage (as root): `rsyncfs-fuse-uring-probe [--rounds N] [--names N] [--transport T]...`,
//! with T one of `classic` (four threads reading `/dev/fuse`, as the logger does today),
//! `classic-pinned` (the same with the servers and the caller on CPU 0: the floor of the
//! classic loop) and `uring` (a queue per possible CPU, its thread pinned to that CPU). The
//! io_uring transport needs the `fuse` module's `enable_uring` parameter; the program says so
//! and skips it when it is off.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_GETXATTR: u32 = 22;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_CREATE: u32 = 35;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const FUSE_INIT_EXT: u32 = 1 << 30;
/// `FUSE_OVER_IO_URING` (bit 41 of the 64-bit flags) as a bit of `flags2`.
const FUSE_OVER_IO_URING_FLAGS2: u32 = 1 << (41 - 32);

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// `struct fuse_uring_req_header`: the in/out header (128), the operation's own header (128)
/// and `struct fuse_uring_ent_in_out` (32).
const RING_HEADER: usize = 288;
const RING_OP_IN: usize = 128;
const RING_ENT_IN_OUT: usize = 256;
const MAX_WRITE: u32 = 128 * 1024;
/// Per ring entry: at least the kernel's `max(FUSE_MIN_READ_BUFFER, max_write, max_pages *
/// PAGE_SIZE)`.
const RING_PAYLOAD: usize = 256 * 1024;
const RING_DEPTH: u32 = 8;
const CLASSIC_THREADS: usize = 4;
/// The classic loop's read buffer: a request is at most its header and `max_write` bytes.
const CLASSIC_BUFFER: usize = MAX_WRITE as usize + 4096;

fn main() {
    if let Err(e) = run() {
        eprintln!("rsyncfs-fuse-uring-probe: {e}");
        std::process::exit(1);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Classic,
    ClassicPinned,
    Uring,
}

impl Transport {
    fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "classic" => Ok(Transport::Classic),
            "classic-pinned" => Ok(Transport::ClassicPinned),
            "uring" => Ok(Transport::Uring),
            _ => Err(format!(
                "unknown transport {s:?} (classic, classic-pinned, uring)"
            )),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Transport::Classic => "classic",
            Transport::ClassicPinned => "classic-pinned",
            Transport::Uring => "uring",
        }
    }
}

fn run() -> Result<(), String> {
    let mut rounds = 5usize;
    let mut names = 2000u32;
    let mut transports = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--rounds" => {
                rounds = value("--rounds")?
                    .parse()
                    .map_err(|e| format!("--rounds: {e}"))?
            }
            "--names" => {
                names = value("--names")?
                    .parse()
                    .map_err(|e| format!("--names: {e}"))?
            }
            "--transport" => transports.push(Transport::parse(&value("--transport")?)?),
            "-h" | "--help" => {
                println!("usage: rsyncfs-fuse-uring-probe [--rounds N] [--names N] [--transport classic|classic-pinned|uring]...");
                return Ok(());
            }
            _ => return Err(format!("unknown argument {a:?} (see --help)")),
        }
    }
    if rounds == 0 || !(1..=100_000).contains(&names) {
        return Err("--rounds must be at least 1 and --names between 1 and 100000".into());
    }
    if transports.is_empty() {
        transports = vec![
            Transport::Classic,
            Transport::ClassicPinned,
            Transport::Uring,
        ];
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse here".into());
    }
    let uring_enabled = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    println!(
        "machine: {} CPUs online, kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "{:<16} {:>22} {:>22}",
        "transport", "stat (LOOKUP) us", "create+close us"
    );
    for t in transports {
        if t == Transport::Uring && !uring_enabled {
            println!(
                "{:<16} skipped: /sys/module/fuse/parameters/enable_uring is not Y (echo Y > it, as root)",
                t.name()
            );
            continue;
        }
        let (stat_us, create_us) = measure(t, rounds, names)?;
        println!(
            "{:<16} {:>22} {:>22}",
            t.name(),
            spread(&stat_us),
            spread(&create_us)
        );
    }
    Ok(())
}

/// "median (min-max)" of microsecond figures.
fn spread(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    format!("{:.1} ({:.1}-{:.1})", s[s.len() / 2], s[0], s[s.len() - 1])
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; the call only
    // reads it and changes the calling thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn unpin() {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // SAFETY: as in `pin_to`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..n {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn measure(t: Transport, rounds: usize, names: u32) -> Result<(Vec<f64>, Vec<f64>), String> {
    let dir = std::env::temp_dir().join(format!("rsyncfs-uring-probe.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mount = Mount::new(&dir)?;
    let fs = Arc::new(MemFs::new(names));
    let dev = mount.dev();
    // The handshake happens on the classic loop, before any ring can be registered.
    let (init_tx, init_rx) = std::sync::mpsc::channel::<()>();
    let mut threads = Vec::new();
    let classic_threads = if t == Transport::Uring {
        1
    } else {
        CLASSIC_THREADS
    };
    for _ in 0..classic_threads {
        let fs = Arc::clone(&fs);
        let init_tx = init_tx.clone();
        let pinned = t == Transport::ClassicPinned;
        let uring = t == Transport::Uring;
        threads.push(std::thread::spawn(move || {
            if pinned {
                pin_to(0);
            }
            classic_loop(dev, &fs, uring, Some(init_tx))
        }));
    }
    init_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "no FUSE_INIT within 5 s".to_string())?;
    if t == Transport::Uring {
        if fs.uring_offered.load(Ordering::Relaxed) == 0 {
            return Err("the kernel did not offer FUSE_OVER_IO_URING in FUSE_INIT".into());
        }
        let cpus = possible_cpus()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for qid in 0..cpus {
            let fs = Arc::clone(&fs);
            let ready_tx = ready_tx.clone();
            threads.push(std::thread::spawn(move || {
                pin_to(qid);
                if let Err(e) = uring_queue(dev, qid as u16, &fs, &ready_tx) {
                    let _ = ready_tx.send(Err(e));
                }
            }));
        }
        for _ in 0..cpus {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| "a ring queue did not register within 5 s".to_string())??;
        }
        // The kernel switches to the ring once every queue has an entry; give the last
        // registration a moment to be taken.
        std::thread::sleep(Duration::from_millis(50));
    }
    if t == Transport::ClassicPinned {
        pin_to(0);
    }
    let mut stat_us = Vec::new();
    let mut create_us = Vec::new();
    let mut created = 0u32;
    for _ in 0..rounds {
        let start = Instant::now();
        let stats = names.max(10_000);
        for i in 0..stats {
            let p = dir.join(format!("f{:05}", i % names));
            std::fs::symlink_metadata(&p).map_err(|e| format!("stat {}: {e}", p.display()))?;
        }
        stat_us.push(start.elapsed().as_secs_f64() * 1e6 / stats as f64);
        let start = Instant::now();
        for _ in 0..names {
            let p = dir.join(format!("n{created:07}"));
            created += 1;
            File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
        }
        create_us.push(start.elapsed().as_secs_f64() * 1e6 / names as f64);
    }
    unpin();
    let served = fs.served.load(Ordering::Relaxed);
    let on_ring = fs.on_ring.load(Ordering::Relaxed);
    drop(mount);
    for th in threads {
        let _ = th.join();
    }
    let _ = std::fs::remove_dir(&dir);
    if t == Transport::Uring && on_ring * 2 < served {
        return Err(format!(
            "only {on_ring} of {served} requests came through the ring: the kernel kept the classic queue"
        ));
    }
    Ok((stat_us, create_us))
}

fn possible_cpus() -> Result<usize, String> {
    // "0-1" or "0": the kernel makes a queue per possible CPU and waits for all of them.
    let s =
        std::fs::read_to_string("/sys/devices/system/cpu/possible").map_err(|e| e.to_string())?;
    let last = s.trim().rsplit(['-', ',']).next().unwrap_or("0");
    last.parse::<usize>()
        .map(|n| n + 1)
        .map_err(|e| format!("/sys/devices/system/cpu/possible {s:?}: {e}"))
}

/// The mount: `/dev/fuse` opened, mount(2) done, unmounted (lazily) on drop.
struct Mount {
    dev: File,
    dir: PathBuf,
}

impl Mount {
    fn new(dir: &Path) -> Result<Mount, String> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| format!("/dev/fuse: {e}"))?;
        let opts = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        ))
        .map_err(|e| e.to_string())?;
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: every pointer is to a NUL-terminated string alive for the call.
        let rc = unsafe {
            libc::mount(
                c"rsyncfs-uring-probe".as_ptr(),
                target.as_ptr(),
                c"fuse.rsyncfs-uring-probe".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mount {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Mount {
            dev,
            dir: dir.to_path_buf(),
        })
    }

    fn dev(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: a NUL-terminated path alive for the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // Closing the device (when `dev` drops) aborts the connection, which ends the loops.
    }
}

/// A flat directory: `f00000`.. `fNNNNN` exist from the start, created names are added.
struct MemFs {
    names: u32,
    created: Mutex<HashMap<Vec<u8>, u64>>,
    next_ino: AtomicU64,
    served: AtomicU64,
    on_ring: AtomicU64,
    uring_offered: AtomicU64,
}

const ROOT: u64 = 1;
const FIRST_CREATED: u64 = 1 << 32;

impl MemFs {
    fn new(names: u32) -> MemFs {
        MemFs {
            names,
            created: Mutex::new(HashMap::new()),
            next_ino: AtomicU64::new(FIRST_CREATED),
            served: AtomicU64::new(0),
            on_ring: AtomicU64::new(0),
            uring_offered: AtomicU64::new(0),
        }
    }

    fn find(&self, name: &[u8]) -> Option<u64> {
        if let Some(n) = name.strip_prefix(b"f") {
            let n: u32 = std::str::from_utf8(n).ok()?.parse().ok()?;
            return (n < self.names && name.len() == 6).then_some(2 + n as u64);
        }
        self.created.lock().unwrap().get(name).copied()
    }

    /// Serves one request: its header fields, its operation's bytes (the header of the
    /// operation and what follows it). Returns None for requests that take no reply, else the
    /// error (0 or a negative errno) and the reply's bytes after the out header.
    fn serve(&self, opcode: u32, nodeid: u64, body: &[u8], uring: bool) -> Option<(i32, Vec<u8>)> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let name = |b: &[u8]| b.split(|c| *c == 0).next().unwrap_or(b).to_vec();
        Some(match opcode {
            FUSE_INIT => {
                let major = u32_at(body, 0);
                let minor = u32_at(body, 4);
                let flags = u32_at(body, 12);
                let flags2 = if flags & FUSE_INIT_EXT != 0 {
                    u32_at(body, 16)
                } else {
                    0
                };
                let mut out = vec![0u8; 64];
                put_u32(&mut out, 0, major.min(7));
                put_u32(&mut out, 4, minor);
                put_u32(&mut out, 8, 128 * 1024);
                let mut our_flags = flags & FUSE_INIT_EXT;
                let mut our_flags2 = 0;
                if flags2 & FUSE_OVER_IO_URING_FLAGS2 != 0 {
                    self.uring_offered.store(1, Ordering::Relaxed);
                    if uring {
                        our_flags2 |= FUSE_OVER_IO_URING_FLAGS2;
                        our_flags |= FUSE_INIT_EXT;
                    }
                }
                put_u32(&mut out, 12, our_flags);
                out[16..18].copy_from_slice(&16u16.to_ne_bytes());
                out[18..20].copy_from_slice(&12u16.to_ne_bytes());
                put_u32(&mut out, 20, MAX_WRITE);
                put_u32(&mut out, 24, 1);
                put_u32(&mut out, 32, our_flags2);
                (0, out)
            }
            FUSE_LOOKUP => match self.find(&name(body)) {
                Some(ino) => (0, entry_out(ino)),
                None => (-libc::ENOENT, Vec::new()),
            },
            FUSE_GETATTR => {
                let mut out = vec![0u8; 16];
                put_u64(&mut out, 0, 1);
                out.extend(attr(nodeid));
                (0, out)
            }
            FUSE_CREATE => {
                let ino = self.next_ino.fetch_add(1, Ordering::Relaxed);
                self.created
                    .lock()
                    .unwrap()
                    .insert(name(&body[16.min(body.len())..]), ino);
                let mut out = entry_out(ino);
                out.extend([0u8; 16]);
                put_u64(&mut out, 128, ino);
                (0, out)
            }
            FUSE_FLUSH | FUSE_RELEASE => (0, Vec::new()),
            FUSE_GETXATTR => (-libc::ENODATA, Vec::new()),
            FUSE_STATFS => {
                let mut out = vec![0u8; 80];
                put_u32(&mut out, 40, 4096);
                put_u32(&mut out, 44, 255);
                put_u32(&mut out, 48, 4096);
                (0, out)
            }
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return None,
            FUSE_DESTROY => (0, Vec::new()),
            _ => (-libc::ENOSYS, Vec::new()),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes(s.try_into().unwrap()))
        .unwrap_or(0)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// `struct fuse_attr` (88 bytes): the root is a directory, everything else an empty file.
fn attr(ino: u64) -> Vec<u8> {
    let mut a = vec![0u8; 88];
    put_u64(&mut a, 0, ino);
    let mode = if ino == ROOT {
        libc::S_IFDIR | 0o755
    } else {
        libc::S_IFREG | 0o644
    };
    put_u32(&mut a, 60, mode);
    put_u32(&mut a, 64, 1);
    put_u32(&mut a, 80, 4096);
    a
}

/// `struct fuse_entry_out` (128 bytes) with an entry timeout of zero (each `stat` of a name is
/// a LOOKUP) and an attribute timeout of one second (no GETATTR after it).
fn entry_out(ino: u64) -> Vec<u8> {
    let mut out = vec![0u8; 40];
    put_u64(&mut out, 0, ino);
    put_u64(&mut out, 24, 1);
    out.extend(attr(ino));
    out
}

/// Reads requests from `/dev/fuse` and writes the replies, until the connection ends.
fn classic_loop(
    dev: RawFd,
    fs: &MemFs,
    uring: bool,
    mut init_done: Option<std::sync::mpsc::Sender<()>>,
) {
    // SAFETY: `dev` stays open until the mount is dropped, after which this loop's read fails
    // and it returns; ManuallyDrop keeps this File from closing a descriptor it does not own.
    let mut file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(dev) });
    let mut buf = vec![0u8; CLASSIC_BUFFER];
    loop {
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::ENOENT) =>
            {
                continue
            }
            Err(_) => return,
        };
        if n < IN_HEADER {
            return;
        }
        let opcode = u32_at(&buf, 4);
        let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap());
        let nodeid = u64::from_ne_bytes(buf[16..24].try_into().unwrap());
        let Some((error, body)) = fs.serve(opcode, nodeid, &buf[IN_HEADER..n], uring) else {
            continue;
        };
        let mut reply = Vec::with_capacity(OUT_HEADER + body.len());
        reply.extend(((OUT_HEADER + body.len()) as u32).to_ne_bytes());
        reply.extend(error.to_ne_bytes());
        reply.extend(unique.to_ne_bytes());
        reply.extend(&body);
        if file.write(&reply).is_err() && opcode == FUSE_INIT {
            return;
        }
        if opcode == FUSE_INIT {
            if let Some(tx) = init_done.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// A ring entry's buffers, handed to the kernel by the REGISTER command and kept alive (and
/// unmoved: they are boxed) as long as the ring.
struct RingEntry {
    header: Box<[u8; RING_HEADER]>,
    payload: Box<[u8]>,
    iov: Box<[libc::iovec; 2]>,
}

fn uring_cmd(
    dev: RawFd,
    op: u32,
    qid: u16,
    commit_id: u64,
    user_data: u64,
    iov: Option<&[libc::iovec; 2]>,
) -> squeue::Entry128 {
    // struct fuse_uring_cmd_req: flags (8), commit_id (8), qid (2), padding.
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let mut b = opcode::UringCmd80::new(types::Fd(dev), op).cmd(cmd);
    if let Some(iov) = iov {
        b = b.addr(Some(iov.as_ptr() as u64));
    }
    let entry = b.build().user_data(user_data);
    if iov.is_none() {
        return entry;
    }
    // The crate has no setter for the SQE's `len`, which REGISTER needs (the iovec count, 2):
    // set it in place (offset 24 of `struct io_uring_sqe`).
    // SAFETY: Entry128 is repr(C) over the 128-byte SQE; the bytes are written back unchanged
    // but for the `len` field.
    unsafe {
        let mut raw: [u8; 128] = std::mem::transmute(entry);
        raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
        std::mem::transmute::<[u8; 128], squeue::Entry128>(raw)
    }
}

/// One queue of the ring, on the thread pinned to its CPU: registers its entries, then serves
/// what the kernel puts in them and commits each reply together with the fetch of the next.
fn uring_queue(
    dev: RawFd,
    qid: u16,
    fs: &MemFs,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let mut ring: IoUring<squeue::Entry128, cqueue::Entry> = IoUring::builder()
        .build(RING_DEPTH * 2)
        .map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut entries: Vec<RingEntry> = (0..RING_DEPTH)
        .map(|_| {
            let mut header = Box::new([0u8; RING_HEADER]);
            let mut payload = vec![0u8; RING_PAYLOAD].into_boxed_slice();
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: RING_HEADER,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: RING_PAYLOAD,
                },
            ]);
            RingEntry {
                header,
                payload,
                iov,
            }
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let sqe = uring_cmd(
            dev,
            FUSE_IO_URING_CMD_REGISTER,
            qid,
            0,
            i as u64,
            Some(&e.iov),
        );
        // SAFETY: the iovecs and the buffers they point to live in `entries`, which outlives
        // the ring (dropped after it at the end of this function, when the kernel has let go).
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full".to_string())?;
    }
    ring.submit()
        .map_err(|e| format!("register queue {qid}: {e}"))?;
    let _ = ready.send(Ok(()));
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (i, res) in done {
            if res < 0 {
                // -ENOTCONN and the like: the connection is gone.
                return Ok(());
            }
            let e = &mut entries[i as usize];
            let h = &e.header;
            let len = u32_at(&h[..], 0) as usize;
            let opcode = u32_at(&h[..], 4);
            let unique = u64::from_ne_bytes(h[8..16].try_into().unwrap());
            let nodeid = u64::from_ne_bytes(h[16..24].try_into().unwrap());
            let commit_id = u64::from_ne_bytes(
                h[RING_ENT_IN_OUT + 8..RING_ENT_IN_OUT + 16]
                    .try_into()
                    .unwrap(),
            );
            let payload_sz = u32_at(&h[..], RING_ENT_IN_OUT + 16) as usize;
            let op_in = len.saturating_sub(IN_HEADER + payload_sz).min(RING_OP_IN);
            let mut body = Vec::with_capacity(op_in + payload_sz);
            body.extend_from_slice(&h[RING_OP_IN..RING_OP_IN + op_in]);
            body.extend_from_slice(&e.payload[..payload_sz.min(RING_PAYLOAD)]);
            fs.on_ring.fetch_add(1, Ordering::Relaxed);
            let (error, reply) = fs
                .serve(opcode, nodeid, &body, true)
                .unwrap_or((0, Vec::new()));
            let h = &mut e.header;
            h[0..4].copy_from_slice(&((OUT_HEADER + reply.len()) as u32).to_ne_bytes());
            h[4..8].copy_from_slice(&error.to_ne_bytes());
            h[8..16].copy_from_slice(&unique.to_ne_bytes());
            h[RING_ENT_IN_OUT + 16..RING_ENT_IN_OUT + 20]
                .copy_from_slice(&(reply.len() as u32).to_ne_bytes());
            e.payload[..reply.len()].copy_from_slice(&reply);
            let sqe = uring_cmd(
                dev,
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                qid,
                commit_id,
                i,
                None,
            );
            // SAFETY: as for the registration: the entry's buffers outlive the ring.
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| "submission queue full".to_string())?;
        }
    }
}

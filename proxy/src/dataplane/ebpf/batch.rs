//! `BPF_MAP_LOOKUP_BATCH` through the raw bpf syscall: aya 0.14 has no
//! wrapper, and walking a map of a few hundred thousand flows key by key
//! costs two syscalls per entry.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

/// `union bpf_attr`'s batch member (also used by the service tables'
/// update and delete batches).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Where a walk over a map stands: `None` at the start.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor(pub Option<u64>);

impl Cursor {
    pub fn at_start(&self) -> bool {
        self.0.is_none()
    }
}

/// Reads up to `chunk` entries from `cursor` on into `out`; true when the
/// walk reached the end of the map (the cursor is then back at the start).
pub fn lookup_batch<K: aya::Pod, V: aya::Pod>(
    fd: RawFd,
    cursor: &mut Cursor,
    chunk: usize,
    out: &mut Vec<(K, V)>,
) -> io::Result<bool> {
    // SAFETY: Pod types are plain integers; all-zero is a valid value.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; chunk];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; chunk];
    let in_batch = cursor.0.unwrap_or(0);
    let mut out_batch: u64 = 0;
    let mut attr = BatchAttr {
        in_batch: if cursor.0.is_some() {
            &in_batch as *const u64 as u64
        } else {
            0
        },
        out_batch: &mut out_batch as *mut u64 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: chunk as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: the attr points at buffers of `chunk` keys and values and at
    // the two batch tokens, all alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    let err = (rc < 0).then(io::Error::last_os_error);
    let n = (attr.count as usize).min(chunk);
    out.extend(keys.into_iter().zip(values).take(n));
    match err {
        None => {
            cursor.0 = Some(out_batch);
            Ok(false)
        }
        Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            cursor.0 = None;
            Ok(true)
        }
        Some(e) => {
            cursor.0 = None;
            Err(e)
        }
    }
}

/// The kernel's ENOTSUPP (not in libc): a map type without batch ops.
const ENOTSUPP: i32 = 524;

/// Errors meaning "this kernel or map type has no batch ops".
pub(super) fn unsupported(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
}

/// Entries per `BPF_MAP_LOOKUP_BATCH` of a whole-map read.
const DUMP_CHUNK: usize = 4096;

/// Every entry of a hash map, a few thousand per syscall (a walk key by key
/// costs two syscalls per entry: 0.7 s for the 222,000 entries of 10,000
/// Services). Errors as the kernel gives them ([`unsupported`]: the map or
/// kernel has no batch lookup).
pub fn dump_all<K: aya::Pod, V: aya::Pod>(fd: RawFd) -> io::Result<Vec<(K, V)>> {
    let mut cursor = Cursor::default();
    let mut out = Vec::new();
    while !lookup_batch(fd, &mut cursor, DUMP_CHUNK, &mut out)? {}
    Ok(out)
}

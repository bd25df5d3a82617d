//! The agent's only unsafe code: thin wrappers over libc calls that std does
//! not offer (statvfs, access). Each call site states why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Space and inodes available to unprivileged users, and the mount's flags.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FsStats {
    pub(crate) avail_bytes: u64,
    pub(crate) avail_inodes: u64,
    pub(crate) read_only: bool,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `statvfs(2)` of the filesystem holding `path`.
// The field types differ between targets (u32 on some 32-bit libcs).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn statvfs(path: &Path) -> io::Result<FsStats> {
    let c = c_path(path)?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call, and
    // `st` points to writable memory of the right size and alignment.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled in the whole struct.
    let st = unsafe { st.assume_init() };
    Ok(FsStats {
        avail_bytes: (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        avail_inodes: st.f_favail as u64,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

/// Whether this process may write into `path` (`access(2)` with `W_OK`): a
/// write probe that writes nothing.
pub(crate) fn can_write(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EACCES | libc::EROFS | libc::EPERM) => Ok(false),
        _ => Err(err),
    }
}

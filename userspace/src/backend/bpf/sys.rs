//! The bpf(2) calls aya 0.14 does not expose: opening a pinned object as an fd, a link's
//! info up to its device (aya's `LinkInfo` hides the per-type part), deleting from an array
//! of maps.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

/// `bpf_attr` for `BPF_OBJ_GET`.
#[repr(C, align(8))]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C, align(8))]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info` up to the XDP / TCX members, which share their first field
/// (`ifindex`, 0 once the device is gone) at offset 16.
#[repr(C, align(8))]
#[derive(Debug, Default)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    _pad: u32,
    pub ifindex: u32,
    pub attach_type: u32,
}

/// bpf(2) with `attr`, whose pointers must stay valid for the call.
unsafe fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees what `attr` points to outlives the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const A, std::mem::size_of::<A>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let attr = ObjGetAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `path` outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &attr)? };
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The info of a link.
pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = LinkInfo::default();
    let attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfo>() as u32,
        info: &mut info as *mut LinkInfo as u64,
    };
    // SAFETY: `info` is writable for `info_len` bytes and outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)? };
    Ok(info)
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `bpf_attr` for the element commands.
#[repr(C, align(8))]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Deletes `key` from a map (aya 0.14 has no delete for arrays of maps).
pub fn map_delete<K>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let attr =
        ElemAttr { map_fd: map.as_raw_fd() as u32, _pad: 0, key: key as *const K as u64, value: 0, flags: 0 };
    // SAFETY: `key` outlives the call.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &attr)? };
    Ok(())
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `bpf_attr` for the batch commands.
#[repr(C, align(8))]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Updates `keys[i]` to `values[i]` in one call. For an array of maps (values: map fds) the
/// kernel waits for running programs once for the whole batch instead of once per element.
pub fn map_update_batch(map: BorrowedFd<'_>, keys: &[u32], values: &[u32]) -> io::Result<()> {
    assert_eq!(keys.len(), values.len());
    let attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` and `values` outlive the call and hold `count` elements each.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &attr)? };
    Ok(())
}

/// Deletes `keys` in one call (one wait for running programs, as `map_update_batch`).
pub fn map_delete_batch(map: BorrowedFd<'_>, keys: &[u32]) -> io::Result<()> {
    let attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: 0,
        count: keys.len() as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` outlives the call and holds `count` elements.
    unsafe { bpf(BPF_MAP_DELETE_BATCH, &attr)? };
    Ok(())
}

//! An array map's elements mapped into this process (`BPF_F_MMAPABLE`): written and read as
//! memory, no system call per element. Used for the CGNAT slot tables and the services'
//! Maglev tables, which are filled whole.

use anyhow::{Context, Result};
use aya::maps::MapData;

/// Unmapped on drop (the elements stay in the kernel).
pub struct Mapped<T> {
    ptr: *mut T,
    len: usize,
    bytes: usize,
}

impl<T: aya::Pod> Mapped<T> {
    /// Maps all of `map`'s elements; refuses a map whose values are not `T` (the kernel lays
    /// array elements out `round_up(value_size, 8)` apart: `T` must be a multiple of 8 bytes
    /// for the slice to match).
    pub fn new(map: &MapData, writable: bool) -> Result<Self> {
        use std::os::fd::{AsFd, AsRawFd};
        let info = map.info()?;
        let len = info.max_entries() as usize;
        anyhow::ensure!(
            info.value_size() as usize == size_of::<T>() && size_of::<T>().is_multiple_of(8),
            "an array of {} B values, expected {} B",
            info.value_size(),
            size_of::<T>()
        );
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = (len * size_of::<T>()).div_ceil(page) * page;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a shared mapping of the map's own pages, `bytes` long (the kernel refuses
        // more than the array holds); unmapped once in drop.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), bytes, prot, libc::MAP_SHARED, map.fd().as_fd().as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of an array map");
        }
        Ok(Self { ptr: ptr.cast(), len, bytes })
    }

    pub fn elements(&self) -> &[T] {
        // SAFETY: `len` elements of `T` (the element stride, checked in `new`) are mapped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn elements_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `elements`; mapped writable when written (a read-only mapping is
        // only read through `elements`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T> Drop for Mapped<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.bytes) };
    }
}

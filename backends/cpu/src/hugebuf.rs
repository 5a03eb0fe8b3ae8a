//! Zeroed byte buffers for the packed weights, backed by 2 MiB pages where the kernel
//! gives them (Linux transparent huge pages on request, `MADV_HUGEPAGE`).
//!
//! Decode streams every weight once per token: hundreds of MiB. With 4 KiB pages that is a
//! TLB miss every 4 KiB, and the hardware prefetchers stop at each 4 KiB page boundary, so
//! a moderately sized matrix (a feed-forward projection, a few MiB) is read well below the
//! memory bandwidth. On 2 MiB pages it streams like one long array. The buffer is mapped
//! 2 MiB-aligned and advised before it is first touched; its tail past the last whole huge
//! page uses small pages, so no memory is wasted. Where mapping fails (or off Linux) it is
//! an ordinary heap allocation.

use std::ops::{Deref, DerefMut};

/// A zeroed, fixed-size byte buffer (see the module docs).
pub(crate) enum HugeBuf {
    #[cfg(target_os = "linux")]
    Mapped {
        ptr: *mut u8,
        len: usize,
    },
    Heap(Vec<u8>),
}

// SAFETY: `Mapped` owns its private anonymous mapping exclusively, like a `Vec<u8>`.
unsafe impl Send for HugeBuf {}
// SAFETY: as above; shared access is read-only through `Deref`.
unsafe impl Sync for HugeBuf {}

const HUGE: usize = 2 << 20;
const PAGE: usize = 4096;

impl HugeBuf {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> HugeBuf {
        #[cfg(target_os = "linux")]
        if len >= HUGE {
            let map_len = len.next_multiple_of(PAGE);
            let over = map_len + HUGE;
            // SAFETY: a fresh private anonymous mapping; the parts outside the aligned
            // `map_len` bytes are unmapped again, the rest is owned by the buffer.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    over,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    let base = p as usize;
                    let start = base.next_multiple_of(HUGE);
                    if start > base {
                        libc::munmap(p, start - base);
                    }
                    let end = start + map_len;
                    if base + over > end {
                        libc::munmap(end as *mut libc::c_void, base + over - end);
                    }
                    // A hint: without it (or where refused) the pages are small ones.
                    libc::madvise(start as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE);
                    return HugeBuf::Mapped { ptr: start as *mut u8, len };
                }
            }
        }
        HugeBuf::Heap(vec![0u8; len])
    }
}

impl Deref for HugeBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            #[cfg(target_os = "linux")]
            // SAFETY: `len` bytes of the buffer's own mapping, zero-initialised by the kernel.
            HugeBuf::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            HugeBuf::Heap(v) => v,
        }
    }
}

impl DerefMut for HugeBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            #[cfg(target_os = "linux")]
            // SAFETY: as in `deref`, and `&mut self` is exclusive.
            HugeBuf::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts_mut(*ptr, *len) },
            HugeBuf::Heap(v) => v,
        }
    }
}

impl Drop for HugeBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let HugeBuf::Mapped { ptr, len } = *self {
            // SAFETY: the mapping made in `zeroed`, `len` rounded as it was mapped.
            unsafe {
                libc::munmap(ptr.cast(), len.next_multiple_of(PAGE));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_writable_and_sized() {
        for len in [0, 1, 4095, HUGE - 1, HUGE, HUGE + 12_345, 3 * HUGE] {
            let mut b = HugeBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            for (i, x) in b.iter_mut().enumerate() {
                *x = i as u8;
            }
            assert!(b.iter().enumerate().all(|(i, &x)| x == i as u8));
            if len >= HUGE {
                assert_eq!(b.as_ptr() as usize % HUGE, 0, "{len} bytes: not 2 MiB-aligned");
            }
        }
    }
}

//! The daemon's global allocator (`src/main.rs`).
//!
//! Ingest and delivery allocate many short-lived buffers on every core, and
//! mimalloc cut what glibc malloc cost there (about a sixth of the CPU under
//! load; BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// mimalloc, asked for alignment only when a layout needs more than every
/// block has. The `mimalloc` crate's allocator passes each layout's
/// alignment to `mi_malloc_aligned`, whose fast path takes only blocks of
/// at most 1 KiB that happen to be aligned: every larger allocation took
/// its slow path, about 75 instructions a call where `mi_malloc` takes a
/// fraction, 44 calls per webhook (callgrind; BENCHMARKS.md, session 24).
/// mimalloc aligns every block as `malloc` must: on 64-bit targets its
/// size classes above 8 bytes are multiples of 16 and pages start their
/// blocks 16-aligned, so a block is aligned to 16 or to its size, whichever
/// is less; the standard library's `System` allocator relies on the same
/// rule of `malloc`. (Debug builds, the tests', check every pointer.)
pub struct Mimalloc;

/// The alignment every mimalloc block has (`MI_MAX_ALIGN_SIZE`, like
/// `max_align_t`), for blocks of at least that size.
const MIN_ALIGN: usize = 16;

/// Whether a block of `size` from the plain calls has `align` already.
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

fn aligned(p: *mut c_void, align: usize) -> *mut u8 {
    debug_assert!(
        (p as usize).is_multiple_of(align),
        "mimalloc block {p:p} not aligned to {align}"
    );
    p.cast()
}

// SAFETY: every pointer handed out comes from mimalloc with at least the
// layout's size and alignment (`plain` layouts by mimalloc's own guarantee,
// the others from its aligned calls), and every one is freed or
// reallocated by mimalloc, which finds a block's page from any pointer it
// gave out, aligned or not.
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls take any size and alignment.
        let p = unsafe {
            match plain(layout.align(), layout.size()) {
                true => libmimalloc_sys::mi_malloc(layout.size()),
                false => libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()),
            }
        };
        aligned(p, layout.align())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe {
            match plain(layout.align(), layout.size()) {
                true => libmimalloc_sys::mi_zalloc(layout.size()),
                false => libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()),
            }
        };
        aligned(p, layout.align())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from mimalloc; the new block keeps the alignment
        // the layout asks for, by the same rule as `alloc` at the new size.
        let p = unsafe {
            match plain(layout.align(), new_size) {
                true => libmimalloc_sys::mi_realloc(ptr.cast(), new_size),
                false => libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()),
            }
        };
        aligned(p, layout.align())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment the plain path takes, and some it does
    /// not, come back aligned as asked, writable over their whole size,
    /// and survive growing and shrinking with their contents intact.
    #[test]
    fn blocks_are_aligned_as_their_layout_asks() {
        let a = Mimalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=300).chain([511, 512, 1000, 1024, 1025, 4000, 4096, 70_000, 1 << 20]) {
                let Ok(layout) = Layout::from_size_align(size, align) else {
                    continue;
                };
                // SAFETY: a layout of non-zero size; each block is written only
                // within its size and freed once, with the layout it has.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    p.write_bytes(0xAB, size);
                    let grown = size * 3 + 7;
                    let q = a.realloc(p, layout, grown);
                    assert_eq!(q as usize % align, 0, "grown to {grown}, align {align}");
                    assert!((0..size).all(|i| *q.add(i) == 0xAB), "contents lost growing {size}");
                    let shrunk = size.div_ceil(2);
                    let grown_layout = Layout::from_size_align(grown, align).unwrap();
                    let r = a.realloc(q, grown_layout, shrunk);
                    assert_eq!(r as usize % align, 0, "shrunk to {shrunk}, align {align}");
                    assert!((0..shrunk).all(|i| *r.add(i) == 0xAB), "contents lost shrinking");
                    a.dealloc(r, Layout::from_size_align(shrunk, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed size {size}, align {align}");
                    assert!((0..size).all(|i| *z.add(i) == 0), "not zeroed: size {size}");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}

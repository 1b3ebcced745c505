//! The allocator of the musl build (`make build-release`).
//!
//! A static glibc binary spends ~0.4 ms of every exec in start-up CPUID
//! (each one traps in a VM); musl's start-up has none. musl's own
//! allocator, though, maps and unmaps memory at a high rate (about 120
//! `mmap`/`munmap` calls in one ADD, more than the start-up saves). This
//! one is talc on regions taken from the kernel as the heap grows and kept:
//! a CNI call lives a few milliseconds, and the daemons this binary also
//! runs reuse what they freed.

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::libc;
use talc::{OomHandler, Span, Talc, Talck};

#[global_allocator]
static ALLOCATOR: Talck<Yielding, Regions> = Talc::new(Regions).lock();

/// The smallest region taken from the kernel at a time.
const REGION: usize = 4 << 20;

/// Gives the heap a region from the kernel each time it runs out.
pub struct Regions;

impl OomHandler for Regions {
    fn handle_oom(talc: &mut Talc<Self>, layout: Layout) -> Result<(), ()> {
        // Room for the allocation at its alignment, and talc's own marks.
        let size = layout
            .size()
            .checked_add(layout.align())
            .and_then(|n| n.checked_add(64 << 10))
            .ok_or(())?
            .max(REGION)
            .checked_next_multiple_of(4096)
            .ok_or(())?;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(());
        }
        // SAFETY: the region is ours, writable, and handed to talc alone,
        // never unmapped.
        unsafe { talc.claim(Span::from_base_size(base.cast(), size)) }.map(|_| ())
    }
}

/// The heap's lock: a short spin, then the CPU yielded to the holder (a
/// pure spin lock would burn a time slice on two CPUs while the holder is
/// preempted). It allocates nothing.
pub struct Yielding(AtomicBool);

// SAFETY: `lock` returns only once this thread set the flag from false to
// true (acquire), and `unlock` clears it (release): one holder at a time.
unsafe impl lock_api::RawMutex for Yielding {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Yielding(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        let mut spins = 0u32;
        while !self.try_lock() {
            if spins < 64 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

//! The CPU backend reuses its buffers across sampler steps: after a warm-up, a step of the joint sampler
//! (two networks, run side by side) allocates only a few small bookkeeping vectors and the two score
//! tensors it hands to the sampler, not the hundreds of intermediate tensors (storage and shared headers)
//! of the two forwards. Counted with a global allocator that counts calls (this test binary only).
use jointdiff_core::ncsnv2::{Ncsnv2, Ncsnv2Config};
use jointdiff_core::operator::Operator;
use jointdiff_core::prior::NetworkPrior;
use jointdiff_core::sampler::{JointSampler, SamplerConfig};
use jointdiff_cpu::CpuBackend;
use jointdiff_tests::init_by_name;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CALLS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        CALLS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn a_sampler_step_allocates_almost_nothing() {
    let cfg = Ncsnv2Config {
        channels: 1,
        ngf: 16,
        input_map: true,
    };
    let net = Ncsnv2::from_fn(&CpuBackend, cfg, init_by_name).unwrap();
    let prior = NetworkPrior {
        net: &net,
        image_size: Some([28, 28]),
    };
    let sampler = |steps: usize| {
        let config = SamplerConfig {
            steps,
            alpha: 0.5,
            ..SamplerConfig::default()
        };
        let op = Operator::Scale(0.5);
        JointSampler::new(
            &CpuBackend,
            config,
            &op,
            None,
            &prior,
            &prior,
            [1, 28, 28],
            [1, 28, 28],
        )
        .unwrap()
    };
    let y = vec![0.3f32; 2 * 28 * 28];
    let calls = |steps: usize| {
        let s = sampler(steps);
        let before = CALLS.load(Ordering::Relaxed);
        let post = jointdiff_cpu::on_worker(|| s.sample(&y, 0, &mut |_, _| true)).unwrap();
        let after = CALLS.load(Ordering::Relaxed);
        assert!(post.signal.data.iter().all(|v| v.is_finite()));
        after - before
    };
    calls(12); // warm-up: the threads' buffer pools fill
    let (short, long) = (calls(10), calls(30));
    let per_step = long.saturating_sub(short) as f64 / 20.0;
    println!("allocator calls: 10 steps {short}, 30 steps {long}, {per_step:.1} per step");
    // two forwards of NCSNv2 make about 300 tensors each; without reuse that is 600+ allocations a step
    // (and as many again for the tensors' shared headers); 8 a step measured (2026-12-07), 39 before the
    // refine blocks stopped listing their inputs' RCU outputs
    assert!(per_step < 20.0, "{per_step} allocations per step");
}

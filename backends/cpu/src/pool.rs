//! Buffers reused across operations and sampler steps: every tensor the CPU backend makes takes its storage
//! from this thread's pool, and a [`CpuTensor`](crate::CpuTensor) gives it back when dropped. A sampler
//! step makes and drops the same tensors as the step before, so after the first step the backend's
//! operations allocate nothing.
use jointdiff_core::Tensor;
use std::cell::RefCell;

/// Most buffers one thread keeps.
const MAX_BUFFERS: usize = 96;
/// Most floats one thread keeps (64 MB): larger sets (training batches) are not hoarded.
const MAX_FLOATS: usize = 1 << 24;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A zeroed tensor, its storage from this thread's pool when a buffer is large enough (the smallest such).
pub(crate) fn zeros(shape: [usize; 4]) -> Tensor {
    let len: usize = shape.iter().product();
    let mut data = with_capacity(len);
    data.resize(len, 0.0);
    Tensor { shape, data }
}

/// An empty vector with room for `len` floats, from this thread's pool when a buffer is large enough.
pub(crate) fn with_capacity(len: usize) -> Vec<f32> {
    let data = POOL
        .try_with(|p| {
            let mut p = p.try_borrow_mut().ok()?;
            let best = p
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= len)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i)?;
            Some(p.swap_remove(best))
        })
        .ok()
        .flatten();
    match data {
        Some(mut v) => {
            v.clear();
            v
        }
        None => Vec::with_capacity(len),
    }
}

/// A tensor holding a copy of `src`.
pub(crate) fn copy(src: &Tensor) -> Tensor {
    let mut data = with_capacity(src.data.len());
    data.extend_from_slice(&src.data);
    Tensor {
        shape: src.shape,
        data,
    }
}

/// A tensor of `shape` whose values `fill` appends to an empty pooled vector (no zeroing first).
///
/// # Panics
/// If `fill` does not append exactly one value per element.
pub(crate) fn map(shape: [usize; 4], fill: impl FnOnce(&mut Vec<f32>)) -> crate::CpuTensor {
    let len: usize = shape.iter().product();
    let mut data = with_capacity(len);
    fill(&mut data);
    assert_eq!(
        data.len(),
        len,
        "an elementwise operation wrote the wrong length"
    );
    Tensor { shape, data }.into()
}

/// A tensor of `shape` whose values `fill` writes into the uninitialised pooled storage it is given (no
/// zeroing first; a plain loop over the slice inlines into a `wide` closure, where `Vec::extend` may not).
///
/// # Safety
/// `fill` must write every element of the slice.
pub(crate) unsafe fn filled(
    shape: [usize; 4],
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]),
) -> crate::CpuTensor {
    let len: usize = shape.iter().product();
    let mut data = with_capacity(len);
    fill(&mut data.spare_capacity_mut()[..len]);
    // SAFETY: the caller's promise: all `len` values were written
    unsafe { data.set_len(len) };
    Tensor { shape, data }.into()
}

/// Takes `v` back into this thread's pool (or frees it when the pool is full).
pub(crate) fn give(v: Vec<f32>) {
    if v.capacity() == 0 || v.capacity() > MAX_FLOATS {
        return;
    }
    let _ = POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            let held: usize = p.iter().map(Vec::capacity).sum();
            if p.len() < MAX_BUFFERS && held + v.capacity() <= MAX_FLOATS {
                p.push(v);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_buffers_come_back_zeroed_and_sized() {
        let mut a = zeros([1, 2, 3, 4]);
        a.data.iter_mut().for_each(|v| *v = 7.0);
        let ptr = a.data.as_ptr();
        give(a.data);
        // a smaller tensor reuses the buffer, all zeros, its own length
        let b = zeros([1, 1, 3, 4]);
        assert_eq!(b.data.as_ptr(), ptr);
        assert_eq!(b.data.len(), 12);
        assert!(b.data.iter().all(|&v| v == 0.0));
        // nothing large enough: a fresh buffer
        let c = zeros([1, 1, 100, 100]);
        assert_ne!(c.data.as_ptr(), ptr);
        assert_eq!(c.data.len(), 10_000);
    }
}

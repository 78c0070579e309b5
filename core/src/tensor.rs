//! A plain host tensor: four dimensions (NCHW) of `f32` in row-major order.
use crate::error::{Error, Result};
use alloc::vec;
use alloc::vec::Vec;

/// Dense NCHW `f32` tensor in host memory. Convolution weights use the same type as `[O, I, KH, KW]`,
/// per-channel parameters as `[1, C, 1, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: [usize; 4],
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: [usize; 4]) -> Self {
        Tensor {
            shape,
            data: vec![0.0; shape.iter().product()],
        }
    }

    /// Wraps `data` after checking that its length matches `shape`.
    pub fn from_vec(shape: [usize; 4], data: Vec<f32>) -> Result<Self> {
        let n = checked_numel(&shape)?;
        if n != data.len() {
            return Err(Error::shape(alloc::format!(
                "shape {:?} needs {} values, got {}",
                shape,
                n,
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Elements of one batch item.
    pub fn item_len(&self) -> usize {
        self.shape[1] * self.shape[2] * self.shape[3]
    }

    pub fn item(&self, i: usize) -> &[f32] {
        let l = self.item_len();
        &self.data[i * l..(i + 1) * l]
    }

    pub fn item_mut(&mut self, i: usize) -> &mut [f32] {
        let l = self.item_len();
        &mut self.data[i * l..(i + 1) * l]
    }

    /// Index of the first NaN or infinite value, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        self.data.iter().position(|v| !v.is_finite())
    }
}

/// Product of the dimensions, or an error when it overflows (untrusted shapes).
pub fn checked_numel(shape: &[usize]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::format(alloc::format!("shape {:?} is too large", shape)))
    })
}

/// Largest absolute difference divided by the largest absolute value of `reference`
/// (the "relative error" every agreement test in this project states).
pub fn rel_max_err(actual: &[f32], reference: &[f32]) -> f64 {
    if actual.len() != reference.len() {
        return f64::INFINITY;
    }
    let mut num = 0f64;
    let mut den = 0f64;
    for (a, r) in actual.iter().zip(reference) {
        num = num.max((*a as f64 - *r as f64).abs());
        den = den.max((*r as f64).abs());
    }
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

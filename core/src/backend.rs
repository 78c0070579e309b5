//! The operations NCSNv2 and the sampler need, as a trait each backend implements once.
//!
//! The network ([`crate::ncsnv2::Ncsnv2`]) is written against this trait only. A backend owns its tensor
//! type (host memory for the CPU backends, device buffers for a GPU backend); weights are uploaded once
//! when a model is prepared for a backend, so a prepared model is immutable and can be shared by threads.
use crate::tensor::Tensor;

/// Parameters of a stride-1 2-D convolution with symmetric zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub padding: usize,
    pub dilation: usize,
}

impl Conv2dParams {
    /// "same" padding for a 3x3 kernel with the given dilation (as `nn.Conv2d(padding=dilation)`).
    pub fn same3(dilation: usize) -> Self {
        Conv2dParams {
            padding: dilation,
            dilation,
        }
    }
    /// A 1x1 convolution.
    pub fn pointwise() -> Self {
        Conv2dParams {
            padding: 0,
            dilation: 1,
        }
    }
}

/// Everything a backend must provide. All image tensors are NCHW; per-channel parameters are `[1, C, 1, 1]`.
///
/// Shapes are checked by the caller (the network validates its weights when it is built and its input
/// when it runs), so implementations may assume consistent shapes.
pub trait Backend: Send + Sync {
    /// The backend's tensor (host or device memory).
    type Tensor: Clone + Send + Sync;

    fn name(&self) -> &'static str;
    fn upload(&self, t: &Tensor) -> Self::Tensor;
    /// The tensor in host memory (a GPU backend reads it back; that can fail).
    fn download(&self, t: &Self::Tensor) -> crate::error::Result<Tensor>;
    fn shape(&self, t: &Self::Tensor) -> [usize; 4];

    /// Stride-1 convolution, weight `[O, I, KH, KW]`, optional bias `[1, O, 1, 1]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        p: Conv2dParams,
    ) -> Self::Tensor;
    /// `conv2d(elu(x)) + residual`: the ELU where `elu_input` says, the sum where `residual` is given
    /// (same shape as the output). A backend may fuse them (the CPU backend applies the ELU while it lays
    /// the input out and adds the residual while it writes the output); the result must be what the
    /// separate operations give, which is this default.
    fn conv2d_fused(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        p: Conv2dParams,
        elu_input: bool,
        residual: Option<&Self::Tensor>,
    ) -> Self::Tensor {
        let y = if elu_input {
            self.conv2d(&self.elu(x), w, bias, p)
        } else {
            self.conv2d(x, w, bias, p)
        };
        match residual {
            Some(r) => self.add(&y, r),
            None => y,
        }
    }
    /// 2x2 mean pooling with stride 2 (`ConvMeanPool`'s pooling; H and W even).
    fn mean_pool2(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Max pooling, stride 1, window `k`, padding `pad` (padded cells never win), as `nn.MaxPool2d`.
    fn max_pool(&self, x: &Self::Tensor, k: usize, pad: usize) -> Self::Tensor;
    /// InstanceNorm++ (`InstanceNorm2dPlus` with bias) of ermongroup/ncsnv2.
    fn instance_norm_plus(
        &self,
        x: &Self::Tensor,
        alpha: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
    ) -> Self::Tensor;
    /// `elu(instance_norm_plus(x))`, which NCSNv2 always applies together; backends may fuse them.
    fn instance_norm_plus_elu(
        &self,
        x: &Self::Tensor,
        alpha: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
    ) -> Self::Tensor {
        let y = self.instance_norm_plus(x, alpha, gamma, beta);
        self.elu(&y)
    }
    /// ELU with alpha = 1.
    fn elu(&self, x: &Self::Tensor) -> Self::Tensor;
    /// Bilinear resize with `align_corners = True`.
    fn resize_bilinear(&self, x: &Self::Tensor, h: usize, w: usize) -> Self::Tensor;
    /// `a + b`, same shapes.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Self::Tensor;
    /// `scale * x + shift`, elementwise.
    fn affine(&self, x: &Self::Tensor, scale: f32, shift: f32) -> Self::Tensor;

    // Backward (vector–Jacobian products). Every backend implements them on its own tensors: there is no
    // default that goes through host memory.

    /// Gradients of [`Backend::conv2d`]: `(d x, d w, d bias)`.
    fn conv2d_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        gout: &Self::Tensor,
        p: Conv2dParams,
    ) -> (Self::Tensor, Self::Tensor, Self::Tensor);
    /// The input gradient of [`Backend::conv2d`] alone, shaped `in_shape`: what a vector–Jacobian product
    /// with respect to the network input needs (no weight gradients).
    fn conv2d_backward_input(
        &self,
        w: &Self::Tensor,
        gout: &Self::Tensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> Self::Tensor;
    /// `elu'(elu_at) * conv2d_backward_input(..) + residual`, the input gradient through
    /// `conv2d(elu(x))` (an input VJP through [`Backend::conv2d_fused`]): the ELU's derivative at its input
    /// where `elu_at` is given, the sum where `residual` is (both shaped `in_shape`). A backend may fuse
    /// them (the CPU backend applies both while it writes the gradient); the result must be what the
    /// separate operations give, which is this default.
    fn conv2d_backward_input_fused(
        &self,
        w: &Self::Tensor,
        gout: &Self::Tensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
        elu_at: Option<&Self::Tensor>,
        residual: Option<&Self::Tensor>,
    ) -> Self::Tensor {
        let g = self.conv2d_backward_input(w, gout, in_shape, p);
        let g = match elu_at {
            Some(x) => self.elu_backward(x, &g),
            None => g,
        };
        match residual {
            Some(r) => self.add(&g, r),
            None => g,
        }
    }
    /// Gradient of [`Backend::mean_pool2`] back to `in_shape`.
    fn mean_pool2_backward(&self, gout: &Self::Tensor, in_shape: [usize; 4]) -> Self::Tensor;
    /// Gradient of [`Backend::max_pool`].
    fn max_pool_backward(
        &self,
        x: &Self::Tensor,
        gout: &Self::Tensor,
        k: usize,
        pad: usize,
    ) -> Self::Tensor;
    /// Gradient of [`Backend::elu`] at input `x`.
    fn elu_backward(&self, x: &Self::Tensor, gout: &Self::Tensor) -> Self::Tensor;
    /// Gradient of [`Backend::resize_bilinear`] back to `in_shape`.
    fn resize_bilinear_backward(&self, gout: &Self::Tensor, in_shape: [usize; 4]) -> Self::Tensor;
    /// Gradients of [`Backend::instance_norm_plus`]: `(d x, d alpha, d gamma, d beta)`.
    fn instance_norm_plus_backward(
        &self,
        x: &Self::Tensor,
        alpha: &Self::Tensor,
        gamma: &Self::Tensor,
        gout: &Self::Tensor,
    ) -> (Self::Tensor, Self::Tensor, Self::Tensor, Self::Tensor);

    // The sampler's arithmetic (DESIGN §5: its state stays in backend tensors for the whole loop). Each op
    // states its formula with the order of its f32 operations; host backends follow it exactly, so the CPU
    // and reference backends write the same bits (a GPU backend may contract to FMA: within tolerance).
    // "Broadcast" below: `y` has the shape of `x` or of one item of it (`[1, C, H, W]`), used for every item.

    /// `a * x + b * y`, elementwise, same shapes.
    fn axpby(&self, a: f32, x: &Self::Tensor, b: f32, y: &Self::Tensor) -> Self::Tensor;
    /// `x * y`, elementwise, `y` broadcast.
    fn mul(&self, x: &Self::Tensor, y: &Self::Tensor) -> Self::Tensor;
    /// `x / y`, elementwise, `y` broadcast.
    fn div(&self, x: &Self::Tensor, y: &Self::Tensor) -> Self::Tensor;
    /// `c * x`.
    fn mul_scalar(&self, x: &Self::Tensor, c: f32) -> Self::Tensor;
    /// `x / c`.
    fn div_scalar(&self, x: &Self::Tensor, c: f32) -> Self::Tensor;
    /// `x` clamped to `[lo, hi]` (`f32::clamp`; NaN stays NaN).
    fn clamp(&self, x: &Self::Tensor, lo: f32, hi: f32) -> Self::Tensor;
    /// Per item `i`: `x_i * (c / ||x_i||)`, zero where the norm is zero; the sum of squares in f64 on host
    /// backends (a GPU backend sums in f32), `||x_i||` rounded to f32 before the division.
    fn scale_by_inverse_norm(&self, x: &Self::Tensor, c: f32) -> Self::Tensor;
    /// Per item `i` (flattened): `A x_i` (`transpose` false) or `A^T x_i`, with `a` the row-major matrix
    /// `[1, 1, m, d]`; the result has `out_shape` (`[N, ...]` with the product of the item equal to `m`,
    /// or `d`). Each output is a sequential f32 dot product over the row (`A x`), or accumulated over the
    /// rows in order (`A^T x`).
    fn matmul(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        transpose: bool,
        out_shape: [usize; 4],
    ) -> Self::Tensor;
    /// Score of an independent Gaussian `N(mean, var)` diffused to `N(a mean, a^2 var + s^2)`:
    /// `-(z - a mean) / (a^2 var + s^2)` (`mean` 0 when `None`; `mean`, `var` broadcast), in f64 on host
    /// backends. With `mean` `None` it is also the score's vector–Jacobian product `-g / (a^2 var + s^2)`.
    fn gaussian_score(
        &self,
        z: &Self::Tensor,
        mean: Option<&Self::Tensor>,
        var: &Self::Tensor,
        a: f64,
        s: f64,
    ) -> Self::Tensor;
    /// Whether every value of every tensor is finite: the one value a sampler step reads back.
    fn all_finite(&self, ts: &[&Self::Tensor]) -> crate::error::Result<bool>;

    /// Runs two closures, possibly at the same time: the sampler evaluates the signal and the noise score
    /// through it. Sequential by default; a backend with a thread pool may run them side by side.
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        a();
        b();
    }

    /// How many images of the batch `shape` a network forward (and a taped forward with its input VJP)
    /// runs at a time: a larger batch runs in parts of this size ([`Backend::batch_slice`],
    /// [`Backend::batch_concat`]), the parts through [`Backend::join`]. The whole batch by default. The CPU backend runs one image at a time, so that an
    /// image's activations stay in cache through the network and its threads share a batch by images.
    /// Parts change no value: every network operation computes each image on its own.
    fn forward_part(&self, shape: [usize; 4]) -> usize {
        shape[0]
    }

    /// Images `[start, start + len)` of `x` (through the host by default).
    fn batch_slice(
        &self,
        x: &Self::Tensor,
        start: usize,
        len: usize,
    ) -> crate::error::Result<Self::Tensor> {
        let t = self.download(x)?;
        let [_, c, h, w] = t.shape;
        let per = c * h * w;
        Ok(self.upload(&Tensor {
            shape: [len, c, h, w],
            data: t.data[start * per..(start + len) * per].to_vec(),
        }))
    }

    /// The images of `parts`, in order, as one batch (through the host by default). `parts` is not empty
    /// and its tensors agree in all but the batch size.
    fn batch_concat(&self, parts: &[Self::Tensor]) -> crate::error::Result<Self::Tensor> {
        let mut data = alloc::vec::Vec::new();
        let mut shape = [0; 4];
        for p in parts {
            let t = self.download(p)?;
            shape = [shape[0] + t.shape[0], t.shape[1], t.shape[2], t.shape[3]];
            data.extend_from_slice(&t.data);
        }
        Ok(self.upload(&Tensor { shape, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::RefBackend;

    #[test]
    fn host_batch_slices_and_concatenation_restore_the_batch() {
        // the defaults every backend without its own gets: images [1, 3) and [3, 5) of a batch of 5, then
        // the parts [0, 1), [1, 3), [3, 5) together again
        let b = RefBackend;
        let x = Tensor {
            shape: [5, 2, 3, 1],
            data: (0..30).map(|i| i as f32).collect(),
        };
        let dx = b.upload(&x);
        let mid = b.download(&b.batch_slice(&dx, 1, 2).unwrap()).unwrap();
        assert_eq!(mid.shape, [2, 2, 3, 1]);
        assert_eq!(mid.data, x.data[6..18]);
        let parts = [(0, 1), (1, 2), (3, 2)].map(|(s, n)| b.batch_slice(&dx, s, n).unwrap());
        let whole = b.download(&b.batch_concat(&parts).unwrap()).unwrap();
        assert_eq!(whole.shape, x.shape);
        assert_eq!(whole.data, x.data);
    }
}

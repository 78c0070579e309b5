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
    fn download(&self, t: &Self::Tensor) -> Tensor;
    fn shape(&self, t: &Self::Tensor) -> [usize; 4];

    /// Stride-1 convolution, weight `[O, I, KH, KW]`, optional bias `[1, O, 1, 1]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        p: Conv2dParams,
    ) -> Self::Tensor;
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

    // Backward (vector–Jacobian products). The defaults run the reference loops on host copies, so every
    // backend has a correct backward; fast backends override them.

    /// Gradients of [`Backend::conv2d`]: `(d x, d w, d bias)`.
    fn conv2d_backward(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        gout: &Self::Tensor,
        p: Conv2dParams,
    ) -> (Self::Tensor, Self::Tensor, Self::Tensor) {
        let (gx, gw, gb) = crate::reference::conv2d_backward(
            &self.download(x),
            &self.download(w),
            &self.download(gout),
            p,
        );
        (self.upload(&gx), self.upload(&gw), self.upload(&gb))
    }
    /// The input gradient of [`Backend::conv2d`] alone, shaped `in_shape`: what a vector–Jacobian product
    /// with respect to the network input needs (no weight gradients).
    fn conv2d_backward_input(
        &self,
        w: &Self::Tensor,
        gout: &Self::Tensor,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> Self::Tensor {
        self.upload(&crate::reference::conv2d_backward_input(
            &self.download(w),
            &self.download(gout),
            in_shape,
            p,
        ))
    }
    /// Gradient of [`Backend::mean_pool2`] back to `in_shape`.
    fn mean_pool2_backward(&self, gout: &Self::Tensor, in_shape: [usize; 4]) -> Self::Tensor {
        self.upload(&crate::reference::mean_pool2_backward(
            &self.download(gout),
            in_shape,
        ))
    }
    /// Gradient of [`Backend::max_pool`].
    fn max_pool_backward(
        &self,
        x: &Self::Tensor,
        gout: &Self::Tensor,
        k: usize,
        pad: usize,
    ) -> Self::Tensor {
        self.upload(&crate::reference::max_pool_backward(
            &self.download(x),
            &self.download(gout),
            k,
            pad,
        ))
    }
    /// Gradient of [`Backend::elu`] at input `x`.
    fn elu_backward(&self, x: &Self::Tensor, gout: &Self::Tensor) -> Self::Tensor {
        self.upload(&crate::reference::elu_backward(
            &self.download(x),
            &self.download(gout),
        ))
    }
    /// Gradient of [`Backend::resize_bilinear`] back to `in_shape`.
    fn resize_bilinear_backward(&self, gout: &Self::Tensor, in_shape: [usize; 4]) -> Self::Tensor {
        self.upload(&crate::reference::resize_bilinear_backward(
            &self.download(gout),
            in_shape,
        ))
    }
    /// Gradients of [`Backend::instance_norm_plus`]: `(d x, d alpha, d gamma, d beta)`.
    fn instance_norm_plus_backward(
        &self,
        x: &Self::Tensor,
        alpha: &Self::Tensor,
        gamma: &Self::Tensor,
        gout: &Self::Tensor,
    ) -> (Self::Tensor, Self::Tensor, Self::Tensor, Self::Tensor) {
        let (a, b, c, d) = crate::reference::instance_norm_plus_backward(
            &self.download(x),
            &self.download(alpha),
            &self.download(gamma),
            &self.download(gout),
        );
        (
            self.upload(&a),
            self.upload(&b),
            self.upload(&c),
            self.upload(&d),
        )
    }
}

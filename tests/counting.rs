//! `Counting<B>`: a backend that forwards every operation to `B` and counts what crosses between host and
//! backend (uploads, downloads, reads of the non-finite flag). The residency test runs the sampler on it.
use jointdiff_core::backend::{Backend, Conv2dParams};
use jointdiff_core::{Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Default)]
pub struct Counting<B> {
    pub inner: B,
    pub uploads: AtomicUsize,
    /// Values uploaded.
    pub uploaded: AtomicUsize,
    pub downloads: AtomicUsize,
    pub flags: AtomicUsize,
}

/// Counters at one moment: (uploads, values uploaded, downloads, flag reads).
pub type Snapshot = [usize; 4];

impl<B> Counting<B> {
    pub fn new(inner: B) -> Self {
        Counting {
            inner,
            uploads: AtomicUsize::new(0),
            uploaded: AtomicUsize::new(0),
            downloads: AtomicUsize::new(0),
            flags: AtomicUsize::new(0),
        }
    }
    pub fn snapshot(&self) -> Snapshot {
        [
            self.uploads.load(Ordering::SeqCst),
            self.uploaded.load(Ordering::SeqCst),
            self.downloads.load(Ordering::SeqCst),
            self.flags.load(Ordering::SeqCst),
        ]
    }
}

type T<B> = <B as Backend>::Tensor;

impl<B: Backend> Backend for Counting<B> {
    type Tensor = B::Tensor;
    fn name(&self) -> &'static str {
        "counting"
    }
    fn upload(&self, t: &Tensor) -> T<B> {
        self.uploads.fetch_add(1, Ordering::SeqCst);
        self.uploaded.fetch_add(t.data.len(), Ordering::SeqCst);
        self.inner.upload(t)
    }
    fn download(&self, t: &T<B>) -> Result<Tensor> {
        self.downloads.fetch_add(1, Ordering::SeqCst);
        self.inner.download(t)
    }
    fn all_finite(&self, ts: &[&T<B>]) -> Result<bool> {
        self.flags.fetch_add(1, Ordering::SeqCst);
        self.inner.all_finite(ts)
    }
    fn shape(&self, t: &T<B>) -> [usize; 4] {
        self.inner.shape(t)
    }
    fn conv2d(&self, x: &T<B>, w: &T<B>, bias: Option<&T<B>>, p: Conv2dParams) -> T<B> {
        self.inner.conv2d(x, w, bias, p)
    }
    fn mean_pool2(&self, x: &T<B>) -> T<B> {
        self.inner.mean_pool2(x)
    }
    fn max_pool(&self, x: &T<B>, k: usize, pad: usize) -> T<B> {
        self.inner.max_pool(x, k, pad)
    }
    fn instance_norm_plus(&self, x: &T<B>, a: &T<B>, g: &T<B>, b: &T<B>) -> T<B> {
        self.inner.instance_norm_plus(x, a, g, b)
    }
    fn instance_norm_plus_elu(&self, x: &T<B>, a: &T<B>, g: &T<B>, b: &T<B>) -> T<B> {
        self.inner.instance_norm_plus_elu(x, a, g, b)
    }
    fn elu(&self, x: &T<B>) -> T<B> {
        self.inner.elu(x)
    }
    fn resize_bilinear(&self, x: &T<B>, h: usize, w: usize) -> T<B> {
        self.inner.resize_bilinear(x, h, w)
    }
    fn add(&self, a: &T<B>, b: &T<B>) -> T<B> {
        self.inner.add(a, b)
    }
    fn affine(&self, x: &T<B>, scale: f32, shift: f32) -> T<B> {
        self.inner.affine(x, scale, shift)
    }
    fn conv2d_backward(&self, x: &T<B>, w: &T<B>, g: &T<B>, p: Conv2dParams) -> (T<B>, T<B>, T<B>) {
        self.inner.conv2d_backward(x, w, g, p)
    }
    fn conv2d_backward_input(
        &self,
        w: &T<B>,
        g: &T<B>,
        in_shape: [usize; 4],
        p: Conv2dParams,
    ) -> T<B> {
        self.inner.conv2d_backward_input(w, g, in_shape, p)
    }
    fn mean_pool2_backward(&self, g: &T<B>, in_shape: [usize; 4]) -> T<B> {
        self.inner.mean_pool2_backward(g, in_shape)
    }
    fn max_pool_backward(&self, x: &T<B>, g: &T<B>, k: usize, pad: usize) -> T<B> {
        self.inner.max_pool_backward(x, g, k, pad)
    }
    fn elu_backward(&self, x: &T<B>, g: &T<B>) -> T<B> {
        self.inner.elu_backward(x, g)
    }
    fn resize_bilinear_backward(&self, g: &T<B>, in_shape: [usize; 4]) -> T<B> {
        self.inner.resize_bilinear_backward(g, in_shape)
    }
    fn instance_norm_plus_backward(
        &self,
        x: &T<B>,
        a: &T<B>,
        g: &T<B>,
        gout: &T<B>,
    ) -> (T<B>, T<B>, T<B>, T<B>) {
        self.inner.instance_norm_plus_backward(x, a, g, gout)
    }
    fn axpby(&self, a: f32, x: &T<B>, b: f32, y: &T<B>) -> T<B> {
        self.inner.axpby(a, x, b, y)
    }
    fn mul(&self, x: &T<B>, y: &T<B>) -> T<B> {
        self.inner.mul(x, y)
    }
    fn div(&self, x: &T<B>, y: &T<B>) -> T<B> {
        self.inner.div(x, y)
    }
    fn mul_scalar(&self, x: &T<B>, c: f32) -> T<B> {
        self.inner.mul_scalar(x, c)
    }
    fn div_scalar(&self, x: &T<B>, c: f32) -> T<B> {
        self.inner.div_scalar(x, c)
    }
    fn clamp(&self, x: &T<B>, lo: f32, hi: f32) -> T<B> {
        self.inner.clamp(x, lo, hi)
    }
    fn scale_by_inverse_norm(&self, x: &T<B>, c: f32) -> T<B> {
        self.inner.scale_by_inverse_norm(x, c)
    }
    fn matmul(&self, x: &T<B>, a: &T<B>, transpose: bool, out: [usize; 4]) -> T<B> {
        self.inner.matmul(x, a, transpose, out)
    }
    fn gaussian_score(&self, z: &T<B>, mean: Option<&T<B>>, var: &T<B>, a: f64, s: f64) -> T<B> {
        self.inner.gaussian_score(z, mean, var, a, s)
    }
    fn join(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        self.inner.join(a, b)
    }
}

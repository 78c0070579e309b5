//! Denoising score matching under an SDE (DESIGN §2) with Adam, learning-rate warm-up, gradient clipping
//! and an exponential moving average of the weights. Pure computation: data loading, checkpoints and
//! progress live in the frontends.
//!
//! Every random choice of step `k` (batch indices, flips, times, noise) comes from stream `k` of the
//! seed, so a run resumed at step `k` continues exactly as the uninterrupted run.
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ncsnv2::{param_specs, Ncsnv2, Ncsnv2Config};
use crate::rng::Rng;
use crate::sde::Sde;
use crate::tensor::Tensor;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Stream purpose of training randomness.
pub const TRAIN_PURPOSE: u64 = 4;
/// Stream purpose of the fixed validation noise.
pub const VALID_PURPOSE: u64 = 5;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub sde: Sde,
    pub batch: usize,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Linear learning-rate warm-up over this many steps (0: none).
    pub warmup: u64,
    /// Clip the global gradient norm to this value (0: no clipping).
    pub grad_clip: f64,
    /// EMA decay of the weights (0: the EMA follows the weights).
    pub ema: f64,
    /// Smallest diffusion time drawn, `t ~ U(t_eps, 1)`.
    pub t_eps: f64,
    /// Random horizontal flips of training images.
    pub hflip: bool,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            sde: Sde::vp_default(),
            batch: 32,
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            warmup: 100,
            grad_clip: 1.0,
            ema: 0.999,
            t_eps: 1e-3,
            hflip: false,
            seed: 0,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.sde.validate()?;
        let ok = self.batch > 0
            && self.lr > 0.0
            && self.lr.is_finite()
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.adam_eps > 0.0
            && self.grad_clip >= 0.0
            && (0.0..1.0).contains(&self.ema)
            && self.t_eps > 0.0
            && self.t_eps < 1.0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "invalid training settings: {self:?}"
            )))
        }
    }
}

/// Everything a run needs to continue: weights, Adam moments, EMA weights and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainState {
    pub net: Ncsnv2Config,
    pub step: u64,
    /// name -> (file shape, values), in `param_specs` order of names
    pub params: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    pub adam_m: BTreeMap<String, Vec<f32>>,
    pub adam_v: BTreeMap<String, Vec<f32>>,
    pub ema: BTreeMap<String, Vec<f32>>,
}

impl TrainState {
    /// Fresh state: PyTorch-style initialisation (conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    /// InstanceNorm++ alpha and gamma N(1, 0.02), beta 0), drawn from `seed`.
    pub fn init(net: Ncsnv2Config, seed: u64) -> Result<Self> {
        net.validate()?;
        let mut params = BTreeMap::new();
        let specs = param_specs(&net);
        for (k, s) in specs.iter().enumerate() {
            let n: usize = s.shape.iter().product();
            let mut r = Rng::stream(seed, crate::rng::purpose::INIT, k as u64);
            let values: Vec<f32> = if s.name.ends_with(".alpha") || s.name.ends_with(".gamma") {
                (0..n).map(|_| (1.0 + 0.02 * r.normal()) as f32).collect()
            } else if s.name.ends_with(".beta") {
                vec![0.0; n]
            } else {
                // fan-in of the conv this weight or bias belongs to
                let wname = s.name.trim_end_matches(".bias").trim_end_matches(".weight");
                let fan = specs
                    .iter()
                    .find(|w| w.name == format!("{wname}.weight"))
                    .map(|w| w.shape[1..].iter().product::<usize>())
                    .unwrap_or(1);
                let bound = 1.0 / libm::sqrt(fan as f64);
                (0..n)
                    .map(|_| ((2.0 * r.uniform() - 1.0) * bound) as f32)
                    .collect()
            };
            params.insert(s.name.clone(), (s.shape.clone(), values));
        }
        let zeros: BTreeMap<String, Vec<f32>> = params
            .iter()
            .map(|(k, (_, v))| (k.clone(), vec![0.0; v.len()]))
            .collect();
        let ema = params
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        Ok(TrainState {
            net,
            step: 0,
            params,
            adam_m: zeros.clone(),
            adam_v: zeros,
            ema,
        })
    }

    /// The network with the current (not averaged) weights.
    pub fn network<B: Backend>(&self, b: &B) -> Result<Ncsnv2<B>> {
        Ncsnv2::from_named(b, self.net, |n| {
            Ok(self.params.get(n).map(|(s, v)| (s.clone(), v.clone())))
        })
    }

    /// The network with the EMA weights (the one to ship).
    pub fn ema_network<B: Backend>(&self, b: &B) -> Result<Ncsnv2<B>> {
        Ncsnv2::from_named(b, self.net, |n| {
            Ok(self
                .params
                .get(n)
                .and_then(|(s, _)| self.ema.get(n).map(|v| (s.clone(), v.clone()))))
        })
    }
}

pub use crate::model::TrainInfo as CheckpointInfo;

/// A checkpoint: the model file (EMA weights under the state_dict names, `meta` under `jointdiff`) plus the
/// raw weights and Adam moments as `train.param.*`, `train.adam_m.*`, `train.adam_v.*`, and the step and
/// seed in the metadata's `train` field. Loading it as a model uses the EMA weights.
pub fn to_checkpoint(
    state: &TrainState,
    meta: &crate::model::ModelMeta,
    seed: u64,
) -> Result<Vec<u8>> {
    let mut tensors = Vec::new();
    for (name, (shape, v)) in &state.params {
        let ema = state
            .ema
            .get(name)
            .ok_or_else(|| Error::invalid("ema state missing"))?;
        tensors.push((name.clone(), shape.clone(), ema.clone()));
        tensors.push((format!("train.param.{name}"), shape.clone(), v.clone()));
        let m = state
            .adam_m
            .get(name)
            .ok_or_else(|| Error::invalid("adam state missing"))?;
        let vv = state
            .adam_v
            .get(name)
            .ok_or_else(|| Error::invalid("adam state missing"))?;
        tensors.push((format!("train.adam_m.{name}"), shape.clone(), m.clone()));
        tensors.push((format!("train.adam_v.{name}"), shape.clone(), vv.clone()));
    }
    let mut meta = meta.clone();
    meta.train = Some(CheckpointInfo {
        step: state.step,
        seed,
    });
    crate::model::serialize(Some(&meta), &tensors)
}

/// The training state stored in a checkpoint made by [`to_checkpoint`].
pub fn from_checkpoint(mf: &crate::model::ModelFile) -> Result<(TrainState, CheckpointInfo)> {
    let info = mf.meta.train.clone().ok_or_else(|| {
        Error::format("not a training checkpoint (no train state in its metadata)")
    })?;
    let net = mf.meta.net_config();
    let mut params = BTreeMap::new();
    let (mut adam_m, mut adam_v, mut ema) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for s in param_specs(&net) {
        let get = |k: &str| -> Result<Vec<f32>> {
            match mf.tensors.get(k) {
                Some((shape, v)) if *shape == s.shape => Ok(v.clone()),
                Some((shape, _)) => Err(Error::shape(format!(
                    "tensor '{k}' has shape {shape:?}, expected {:?}",
                    s.shape
                ))),
                None => Err(Error::new(
                    crate::error::ErrorKind::MissingTensor,
                    format!("tensor '{k}' is missing"),
                )),
            }
        };
        ema.insert(s.name.clone(), get(&s.name)?);
        params.insert(
            s.name.clone(),
            (s.shape.clone(), get(&format!("train.param.{}", s.name))?),
        );
        adam_m.insert(s.name.clone(), get(&format!("train.adam_m.{}", s.name))?);
        adam_v.insert(s.name.clone(), get(&format!("train.adam_v.{}", s.name))?);
    }
    Ok((
        TrainState {
            net,
            step: info.step,
            params,
            adam_m,
            adam_v,
            ema,
        },
        info,
    ))
}

/// The denoising score-matching loss `mean_b sum_pixels || net(a x + s w) + w ||^2` of a batch for given
/// times and noise, and the gradient of the loss with respect to the network output.
pub fn dsm_loss<B: Backend>(
    b: &B,
    net: &Ncsnv2<B>,
    sde: &Sde,
    x: &Tensor,
    ts: &[f64],
    w: &Tensor,
) -> Result<(f64, Tensor, Tensor)> {
    let items = x.shape[0];
    let mut z = Tensor::zeros(x.shape);
    if ts.len() != items {
        return Err(Error::shape(format!(
            "{} times for {items} images",
            ts.len()
        )));
    }
    for (i, &t) in ts.iter().enumerate() {
        let (a, s) = (sde.a(t) as f32, sde.s(t) as f32);
        for ((o, &xv), &wv) in z.item_mut(i).iter_mut().zip(x.item(i)).zip(w.item(i)) {
            *o = a * xv + s * wv;
        }
    }
    let out = net.forward(b, &z)?;
    let mut loss = 0f64;
    let mut gout = Tensor::zeros(out.shape);
    let scale = 2.0 / items as f32;
    for ((g, &o), &wv) in gout.data.iter_mut().zip(&out.data).zip(&w.data) {
        let r = o + wv;
        loss += (r as f64) * (r as f64);
        *g = scale * r;
    }
    Ok((loss / items as f64, z, gout))
}

/// Draws step `step`'s batch from `data` (N images), with flips, times and noise, all from stream `step`.
pub fn draw_batch(cfg: &TrainConfig, data: &Tensor, step: u64) -> (Tensor, Vec<f64>, Tensor) {
    let [n, c, h, w] = data.shape;
    let mut rng = Rng::stream(cfg.seed, TRAIN_PURPOSE, step);
    let mut x = Tensor::zeros([cfg.batch, c, h, w]);
    let mut ts = Vec::with_capacity(cfg.batch);
    for i in 0..cfg.batch {
        let k = rng.below(n as u64) as usize;
        let flip = cfg.hflip && rng.uniform() < 0.5;
        let src = data.item(k);
        let dst = x.item_mut(i);
        if flip {
            for ch in 0..c {
                for y in 0..h {
                    for xx in 0..w {
                        dst[(ch * h + y) * w + xx] = src[(ch * h + y) * w + (w - 1 - xx)];
                    }
                }
            }
        } else {
            dst.copy_from_slice(src);
        }
        ts.push(cfg.t_eps + (1.0 - cfg.t_eps) * rng.uniform());
    }
    let mut noise = Tensor::zeros(x.shape);
    rng.fill_normal(&mut noise.data);
    (x, ts, noise)
}

/// One optimisation step: loss and gradients on step `state.step`'s batch, clipping, Adam, EMA.
/// Returns the batch loss and the gradient norm before clipping.
pub fn train_step<B: Backend>(
    b: &B,
    cfg: &TrainConfig,
    state: &mut TrainState,
    data: &Tensor,
) -> Result<(f64, f64)> {
    cfg.validate()?;
    if data.shape[0] == 0 {
        return Err(Error::invalid("no training data"));
    }
    let net = state.network(b)?;
    let (x, ts, w) = draw_batch(cfg, data, state.step);
    let (loss, z, gout) = dsm_loss(b, &net, &cfg.sde, &x, &ts, &w)?;
    if !loss.is_finite() {
        return Err(Error::non_finite(format!(
            "training loss is not finite at step {}",
            state.step
        )));
    }
    let (_, grads) = net.vjp(b, &z, &gout)?;
    let norm = libm::sqrt(
        grads
            .iter()
            .map(|(_, g)| g.data.iter().map(|&v| v as f64 * v as f64).sum::<f64>())
            .sum::<f64>(),
    );
    let clip = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip {
        cfg.grad_clip / norm
    } else {
        1.0
    };
    state.step += 1;
    let t = state.step as f64;
    let lr = if cfg.warmup > 0 {
        cfg.lr * (t / cfg.warmup as f64).min(1.0)
    } else {
        cfg.lr
    };
    let (bc1, bc2) = (1.0 - libm::pow(cfg.beta1, t), 1.0 - libm::pow(cfg.beta2, t));
    for (name, g) in &grads {
        let (_, p) = state
            .params
            .get_mut(name)
            .ok_or_else(|| Error::invalid(format!("no parameter {name}")))?;
        let m = state
            .adam_m
            .get_mut(name)
            .ok_or_else(|| Error::invalid("adam state missing"))?;
        let v = state
            .adam_v
            .get_mut(name)
            .ok_or_else(|| Error::invalid("adam state missing"))?;
        let e = state
            .ema
            .get_mut(name)
            .ok_or_else(|| Error::invalid("ema state missing"))?;
        for i in 0..p.len() {
            let gi = g.data[i] as f64 * clip;
            let mi = cfg.beta1 * m[i] as f64 + (1.0 - cfg.beta1) * gi;
            let vi = cfg.beta2 * v[i] as f64 + (1.0 - cfg.beta2) * gi * gi;
            m[i] = mi as f32;
            v[i] = vi as f32;
            let upd = lr * (mi / bc1) / (libm::sqrt(vi / bc2) + cfg.adam_eps);
            p[i] = (p[i] as f64 - upd) as f32;
            e[i] = (cfg.ema * e[i] as f64 + (1.0 - cfg.ema) * p[i] as f64) as f32;
        }
    }
    Ok((loss, norm))
}

/// The DSM loss of `net` on `data` with fixed times and noise (stream `VALID_PURPOSE` of `seed`), averaged
/// over all images, in batches of `batch`: comparable between checkpoints of one run.
pub fn validation_loss<B: Backend>(
    b: &B,
    net: &Ncsnv2<B>,
    sde: &Sde,
    data: &Tensor,
    seed: u64,
    batch: usize,
) -> Result<f64> {
    let [n, c, h, w] = data.shape;
    let mut total = 0f64;
    let mut start = 0;
    while start < n {
        let end = (start + batch.max(1)).min(n);
        let mut x = Tensor::zeros([end - start, c, h, w]);
        let mut noise = Tensor::zeros(x.shape);
        let mut ts = Vec::new();
        for i in start..end {
            x.item_mut(i - start).copy_from_slice(data.item(i));
            let mut r = Rng::stream(seed, VALID_PURPOSE, i as u64);
            ts.push(1e-3 + (1.0 - 1e-3) * r.uniform());
            r.fill_normal(noise.item_mut(i - start));
        }
        let (l, _, _) = dsm_loss(b, net, sde, &x, &ts, &noise)?;
        total += l * (end - start) as f64;
        start = end;
    }
    Ok(total / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RefBackend;

    /// Images of a simple family: vertical ramps of random height and slope, plus a little noise.
    fn toy_data(n: usize, size: usize, seed: u64) -> Tensor {
        let mut t = Tensor::zeros([n, 1, size, size]);
        for i in 0..n {
            let mut r = Rng::stream(seed, 9, i as u64);
            let (a, b) = (0.2 + 0.3 * r.uniform(), 0.5 * r.uniform());
            for y in 0..size {
                for x in 0..size {
                    t.item_mut(i)[y * size + x] =
                        (a + b * y as f64 / size as f64 + 0.02 * r.normal()) as f32;
                }
            }
        }
        t
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            batch: 8,
            lr: 3e-3,
            warmup: 5,
            grad_clip: 10.0,
            ema: 0.9,
            seed: 3,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn a_tiny_training_run_lowers_the_validation_loss() {
        let b = RefBackend;
        let data = toy_data(64, 8, 1);
        let valid = toy_data(16, 8, 2);
        let net_cfg = Ncsnv2Config {
            channels: 1,
            ngf: 4,
            input_map: true,
        };
        let mut st = TrainState::init(net_cfg, 5).unwrap();
        let c = cfg();
        let before = validation_loss(&b, &st.network(&b).unwrap(), &c.sde, &valid, 7, 16).unwrap();
        for _ in 0..60 {
            train_step(&b, &c, &mut st, &data).unwrap();
        }
        let after = validation_loss(&b, &st.network(&b).unwrap(), &c.sde, &valid, 7, 16).unwrap();
        // a network that outputs 0 scores 64 (the expected ||w||^2); learning must clearly beat the start
        assert!(after < 0.8 * before, "validation loss {before} -> {after}");
        assert_eq!(st.step, 60);
    }

    #[test]
    fn interrupted_and_resumed_equals_uninterrupted() {
        let b = RefBackend;
        let data = toy_data(32, 8, 3);
        let net_cfg = Ncsnv2Config {
            channels: 1,
            ngf: 2,
            input_map: true,
        };
        let c = TrainConfig {
            hflip: true,
            ..cfg()
        };
        let mut straight = TrainState::init(net_cfg, 1).unwrap();
        for _ in 0..6 {
            train_step(&b, &c, &mut straight, &data).unwrap();
        }
        let mut first = TrainState::init(net_cfg, 1).unwrap();
        for _ in 0..3 {
            train_step(&b, &c, &mut first, &data).unwrap();
        }
        // through a checkpoint file's bytes, as `jointdiff train --resume` does
        let meta = crate::model::ModelMeta {
            architecture: "ncsnv2".into(),
            ngf: 2,
            channels: 1,
            image_size: [8, 8],
            input_map: crate::model::InputMap::TwoXMinusOne,
            sde: c.sde,
            data_range: [0.0, 1.0],
            provenance: BTreeMap::new(),
            train: None,
        };
        let bytes = to_checkpoint(&first, &meta, c.seed).unwrap();
        let mf = crate::model::ModelFile::from_bytes(&bytes).unwrap();
        let (mut resumed, info) = from_checkpoint(&mf).unwrap();
        assert_eq!(info.step, 3);
        // the checkpoint is also a model file whose weights are the EMA weights
        let ema_net = mf.build(&b).unwrap();
        let x = toy_data(2, 8, 9);
        assert_eq!(
            ema_net.forward(&b, &x).unwrap(),
            first.ema_network(&b).unwrap().forward(&b, &x).unwrap()
        );
        for _ in 0..3 {
            train_step(&b, &c, &mut resumed, &data).unwrap();
        }
        assert_eq!(resumed, straight);
    }
}

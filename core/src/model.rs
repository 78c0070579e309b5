//! Model files: safetensors with the config as JSON under the metadata key `jointdiff` (DESIGN §4).
//!
//! A file without that key is a reference NCSNv2 checkpoint: the config is inferred from the tensor shapes,
//! inputs are images in [0, 1] mapped by `2x - 1` inside the network, and the SDE is VE.
//! Everything here works on byte slices; reading files is the caller's business.
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::ncsnv2::{param_specs, Ncsnv2, Ncsnv2Config};
use crate::sde::Sde;
use alloc::borrow::Cow;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

/// The metadata key that marks a jointdiff model file.
pub const META_KEY: &str = "jointdiff";
/// Tensors whose names start with this hold training state (raw weights, Adam moments); the network
/// ignores them.
pub const TRAIN_TENSOR_PREFIX: &str = "train.";

/// How images are mapped before the first convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputMap {
    /// `2x - 1`, as the reference NCSNv2 does for data in [0, 1].
    #[serde(rename = "2x-1")]
    TwoXMinusOne,
    #[serde(rename = "identity")]
    Identity,
}

/// The config of a model file (JSON under the `jointdiff` metadata key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub architecture: String,
    pub ngf: usize,
    pub channels: usize,
    /// `[H, W]` the model was trained at; `[0, 0]` when unknown (reference checkpoints).
    #[serde(default)]
    pub image_size: [usize; 2],
    pub input_map: InputMap,
    pub sde: Sde,
    #[serde(default = "default_range")]
    pub data_range: [f32; 2],
    /// Free-form provenance (data, command, steps, ...).
    #[serde(default)]
    pub provenance: BTreeMap<String, String>,
    /// Present in training checkpoints: where the run stands (see `train::to_checkpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainInfo>,
}

/// The training state's scalars in a checkpoint (kept inside the one `jointdiff` metadata entry so that
/// files are byte-for-byte reproducible).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainInfo {
    pub step: u64,
    pub seed: u64,
}

fn default_range() -> [f32; 2] {
    [0.0, 1.0]
}

impl ModelMeta {
    pub fn net_config(&self) -> Ncsnv2Config {
        Ncsnv2Config {
            channels: self.channels,
            ngf: self.ngf,
            input_map: self.input_map == InputMap::TwoXMinusOne,
        }
    }
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A parsed model file: its config and every tensor converted to f32.
#[derive(Debug, Clone)]
pub struct ModelFile {
    pub meta: ModelMeta,
    /// True when the file had no `jointdiff` metadata (a reference NCSNv2 checkpoint).
    pub reference_checkpoint: bool,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    match dtype {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()),
        Dtype::F64 => Ok(bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect()),
        other => Err(Error::format(format!(
            "tensor '{name}' has dtype {other:?}; only F32 and F64 are supported"
        ))),
    }
}

impl ModelFile {
    /// Parses a safetensors buffer. Checks sizes before allocating; never panics on bad bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 {
            return Err(Error::format(format!(
                "not a safetensors file: {} bytes, too short for the header length",
                bytes.len()
            )));
        }
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(format!("not a valid safetensors file: {e}")))?;
        let (_, md) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::format(format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let name = name.strip_prefix("module.").unwrap_or(name);
            if name == "sigmas" {
                continue; // the reference's noise-level buffer is ignored (DESIGN §3)
            }
            let data = to_f32(name, view.dtype(), view.data())?;
            tensors.insert(name.to_string(), (view.shape().to_vec(), data));
        }
        let meta_json = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY).cloned());
        let (meta, reference_checkpoint) = match meta_json {
            Some(js) => {
                let meta: ModelMeta = serde_json::from_str(&js)
                    .map_err(|e| Error::format(format!("invalid '{META_KEY}' metadata: {e}")))?;
                if meta.architecture != "ncsnv2" {
                    return Err(Error::format(format!(
                        "unsupported architecture '{}' (only 'ncsnv2')",
                        meta.architecture
                    )));
                }
                meta.sde.validate()?;
                (meta, false)
            }
            None => (Self::infer_reference(&tensors)?, true),
        };
        meta.net_config().validate()?;
        Ok(ModelFile {
            meta,
            reference_checkpoint,
            tensors,
        })
    }

    fn infer_reference(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) -> Result<ModelMeta> {
        let (shape, _) = tensors.get("begin_conv.weight").ok_or_else(|| {
            Error::new(
                ErrorKind::MissingTensor,
                "tensor 'begin_conv.weight' is missing (not an NCSNv2 checkpoint?)",
            )
        })?;
        if shape.len() != 4 {
            return Err(Error::shape(format!(
                "tensor 'begin_conv.weight' has shape {shape:?}, expected rank 4"
            )));
        }
        Ok(ModelMeta {
            architecture: "ncsnv2".into(),
            ngf: shape[0],
            channels: shape[1],
            image_size: [0, 0],
            input_map: InputMap::TwoXMinusOne,
            sde: Sde::ve_default(),
            data_range: [0.0, 1.0],
            provenance: BTreeMap::new(),
            train: None,
        })
    }

    /// Prepares the network on a backend: checks every tensor's presence and shape, uploads the weights.
    pub fn build<B: Backend>(&self, backend: &B) -> Result<Ncsnv2<B>> {
        let specs = param_specs(&self.meta.net_config());
        for name in self.tensors.keys() {
            if name.starts_with(TRAIN_TENSOR_PREFIX) {
                continue;
            }
            if !specs.iter().any(|s| &s.name == name) {
                return Err(Error::shape(format!(
                    "unexpected tensor '{name}': not part of NCSNv2 with ngf {} and {} channel(s) \
                     (another architecture, such as NCSNv2Deeper?)",
                    self.meta.ngf, self.meta.channels
                )));
            }
        }
        Ncsnv2::from_named(backend, self.meta.net_config(), |name| {
            Ok(self.tensors.get(name).map(|(s, d)| (s.clone(), d.clone())))
        })
    }
}

struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut v = Vec::with_capacity(self.data.len() * 4);
        for x in self.data {
            v.extend_from_slice(&x.to_le_bytes());
        }
        Cow::Owned(v)
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Serialises tensors (name, shape, values) as safetensors, with `meta` under the `jointdiff` key
/// (or no metadata at all, which makes a reference-style checkpoint).
pub fn serialize(
    meta: Option<&ModelMeta>,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), F32View { shape: s, data: d }));
    // one metadata entry only: the header's map order would otherwise vary between runs
    let info = meta.map(|m| [(META_KEY.to_string(), m.to_json())].into_iter().collect());
    safetensors::tensor::serialize(views, info)
        .map_err(|e| Error::format(format!("cannot serialise: {e}")))
}

/// Every parameter of `config` from `init(spec)`, as named tensors ready for [`serialize`].
pub fn init_params<F>(config: &Ncsnv2Config, mut init: F) -> Vec<(String, Vec<usize>, Vec<f32>)>
where
    F: FnMut(&crate::ncsnv2::ParamSpec) -> Vec<f32>,
{
    param_specs(config)
        .into_iter()
        .map(|s| {
            let d = init(&s);
            (s.name, s.shape, d)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ncsnv2::Ncsnv2Config;
    use alloc::vec;

    fn meta() -> ModelMeta {
        let mut provenance = BTreeMap::new();
        provenance.insert("data".to_string(), "unit test".to_string());
        ModelMeta {
            architecture: "ncsnv2".into(),
            ngf: 4,
            channels: 2,
            image_size: [28, 28],
            input_map: InputMap::Identity,
            sde: Sde::vp_default(),
            data_range: [0.0, 1.0],
            provenance,
            train: None,
        }
    }

    #[test]
    fn own_files_roundtrip_with_metadata() {
        let m = meta();
        let params = init_params(&m.net_config(), |s| vec![0.25; s.shape.iter().product()]);
        let bytes = serialize(Some(&m), &params).unwrap();
        let mf = ModelFile::from_bytes(&bytes).unwrap();
        assert!(!mf.reference_checkpoint);
        assert_eq!(mf.meta, m);
        assert_eq!(mf.tensors.len(), params.len());
        let net = mf.build(&crate::RefBackend).unwrap();
        assert_eq!(
            net.config,
            Ncsnv2Config {
                channels: 2,
                ngf: 4,
                input_map: false
            }
        );
        // Without metadata the same tensors read as a reference checkpoint: VE, 2x - 1 input map.
        let refck = ModelFile::from_bytes(&serialize(None, &params).unwrap()).unwrap();
        assert!(refck.reference_checkpoint);
        assert_eq!(refck.meta.sde.name(), "ve");
        assert_eq!(refck.meta.input_map, InputMap::TwoXMinusOne);
    }

    #[test]
    fn bad_files_are_errors() {
        let m = meta();
        let params = init_params(&m.net_config(), |s| vec![0.0; s.shape.iter().product()]);
        // a tensor of an unsupported dtype
        let data = [0u8; 16];
        let v = safetensors::tensor::TensorView::new(Dtype::I32, vec![4], &data).unwrap();
        let bytes = safetensors::tensor::serialize([("begin_conv.weight", v)], None).unwrap();
        let e = ModelFile::from_bytes(&bytes).unwrap_err();
        assert!(e.message.contains("dtype"), "{e}");
        // broken metadata JSON, unknown architecture
        let mut bad = m.clone();
        bad.architecture = "unet".into();
        let e = ModelFile::from_bytes(&serialize(Some(&bad), &params).unwrap()).unwrap_err();
        assert!(e.message.contains("unet"), "{e}");
        let info = Some(
            [(META_KEY.to_string(), "{not json".to_string())]
                .into_iter()
                .collect(),
        );
        let views = params
            .iter()
            .map(|(n, s, d)| (n.as_str(), F32View { shape: s, data: d }));
        let bytes = safetensors::tensor::serialize(views, info).unwrap();
        assert!(ModelFile::from_bytes(&bytes)
            .unwrap_err()
            .message
            .contains("metadata"));
        // an extra tensor (another architecture)
        let mut extra = params.clone();
        extra.push(("res5.0.conv1.weight".into(), vec![1], vec![0.0]));
        let mf = ModelFile::from_bytes(&serialize(Some(&m), &extra).unwrap()).unwrap();
        assert!(mf.build(&crate::RefBackend).is_err());
        // random bytes never panic
        let mut r = crate::rng::Rng::stream(1, 0, 0);
        for len in [0usize, 7, 8, 9, 64, 300] {
            let b: Vec<u8> = (0..len).map(|_| r.below(256) as u8).collect();
            assert!(ModelFile::from_bytes(&b).is_err());
        }
    }
}

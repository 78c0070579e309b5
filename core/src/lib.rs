//! jointdiff-core: the `no_std` + `alloc` heart of jointdiff.
//!
//! It owns the tensor type, the [`Backend`] trait that the NCSNv2 network is written against once,
//! the reference backend (plain loops, the oracle for every other backend), the three SDEs, the joint
//! posterior sampler, measurement operators, priors, the RNG and the parsers for safetensors and npy that
//! work on byte slices. File handling, threads and anything else that needs `std` lives in other crates.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod backend;
pub mod baselines;
#[cfg(feature = "default-models")]
pub mod defaults;
pub mod error;
pub mod metrics;
pub mod model;
pub mod ncsnv2;
pub mod noise;
pub mod npy;
pub mod operator;
pub mod plan;
pub mod prior;
pub mod reference;
pub mod rng;
pub mod sampler;
pub mod sde;
pub mod tensor;
pub mod train;

pub use backend::{Backend, Conv2dParams};
pub use error::{Error, Result};
pub use ncsnv2::{Ncsnv2, Ncsnv2Config};
pub use reference::RefBackend;
pub use tensor::Tensor;

//! One module per command.
pub mod backends;
pub mod bench;
pub mod corrupt;
pub mod demo;
pub mod denoise;
pub mod eval;
pub mod info;
pub mod sample;
pub mod score;
pub mod train;

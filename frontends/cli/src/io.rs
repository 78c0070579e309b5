//! Reading and writing files for the CLI. Every error names the file and the problem.
use anyhow::{anyhow, bail, Context, Result};
use jointdiff_core::model::ModelFile;
use jointdiff_core::npy::NpyArray;
use jointdiff_core::Tensor;
use std::path::{Path, PathBuf};

/// Largest file the CLI reads (models and arrays alike).
const MAX_FILE: u64 = 4 << 30;

pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if meta.is_dir() {
        bail!("{}: is a directory, expected a file", path.display());
    }
    if meta.len() > MAX_FILE {
        bail!(
            "{}: file is {} bytes, larger than the {} byte limit",
            path.display(),
            meta.len(),
            MAX_FILE
        );
    }
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

fn is_png(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

/// An array from `.npy` (any rank) or `.png` (as `[1, C, H, W]` in [0, 1]).
pub fn read_array(path: &Path) -> Result<NpyArray> {
    let bytes = read_bytes(path)?;
    if is_png(path) {
        let t = decode_png(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        return Ok(NpyArray {
            shape: t.shape.to_vec(),
            data: t.data,
            uint8: false,
        });
    }
    NpyArray::parse(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Images as NCHW f32; uint8 npy files are scaled by 1/255.
pub fn read_images(path: &Path) -> Result<Tensor> {
    let mut a = read_array(path)?;
    if a.uint8 {
        a.data.iter_mut().for_each(|v| *v /= 255.0);
    }
    let t = a
        .into_nchw()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if t.data.is_empty() {
        bail!("{}: array is empty", path.display());
    }
    if let Some(i) = t.first_non_finite() {
        bail!(
            "{}: value {} at index {i} is not finite (NaN or Inf)",
            path.display(),
            t.data[i]
        );
    }
    Ok(t)
}

/// The most a PNG's pixel data can inflate: deflate's limit is 1032 : 1, so a header that claims more
/// decoded bytes than this many times the file (plus 1 MiB) is certainly truncated or corrupt.
pub const PNG_MAX_RATIO: u64 = 1100;

/// The largest decoded PNG (8-bit samples) the tool reads: 64 MiB, a 4096 x 4096 color image. Score models
/// take small images; this bounds what a file can make the reader allocate (the decoded image, its 8-bit
/// conversion and the f32 tensor, about 6 times this at most).
pub const PNG_MAX_DECODED: u64 = 64 << 20;

/// A PNG file's bytes as `[1, C, H, W]` in [0, 1] (gray: 1 channel, color: 3). The header's size is
/// checked before anything is decoded: a small file claiming a huge image allocates nothing.
pub fn decode_png(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    use image::ImageDecoder;
    let unreadable = |e: image::ImageError| format!("not a readable PNG: {e}");
    let dec =
        image::codecs::png::PngDecoder::new(std::io::Cursor::new(bytes)).map_err(unreadable)?;
    let ((iw, ih), claim) = (dec.dimensions(), dec.total_bytes());
    let could_hold = (bytes.len() as u64)
        .saturating_mul(PNG_MAX_RATIO)
        .saturating_add(1 << 20);
    if claim > could_hold {
        return Err(format!(
            "the PNG header claims a {iw}x{ih} image ({claim} bytes decoded), more than its {} bytes \
             could hold: the file is truncated or corrupt",
            bytes.len()
        ));
    }
    if claim > PNG_MAX_DECODED {
        return Err(format!(
            "the PNG is {iw}x{ih} ({claim} bytes decoded), larger than the {} MiB this tool reads: \
             resize it first (score models take small images)",
            PNG_MAX_DECODED >> 20
        ));
    }
    let img = image::DynamicImage::from_decoder(dec).map_err(unreadable)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let color = img.color();
    let channels = if color.has_color() { 3 } else { 1 };
    let mut t = Tensor::zeros([1, channels, h, w]);
    if channels == 1 {
        let g = img.to_luma8();
        for (i, p) in g.pixels().enumerate() {
            t.data[i] = p.0[0] as f32 / 255.0;
        }
    } else {
        let rgb = img.to_rgb8();
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                t.data[c * h * w + i] = p.0[c] as f32 / 255.0;
            }
        }
    }
    Ok(t)
}

pub fn write_npy(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    write_atomic(path, &NpyArray::to_bytes(shape, data))
}

/// The temporary file `write_atomic` writes first: hidden, in the same folder (so the rename is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: an interrupted run never
/// leaves a truncated output (or checkpoint) behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.with_context(|| format!("{}: cannot write", path.display()))
}

/// Checks, before a long computation starts, that every output path can be written (its folder exists and
/// takes a new file), so that a run never ends in "cannot write" after the work is done.
pub fn check_writable<'a>(paths: impl IntoIterator<Item = Option<&'a Path>>) -> Result<()> {
    for path in paths.into_iter().flatten() {
        if path.is_dir() {
            bail!("{}: is a folder, not a file to write", path.display());
        }
        let tmp = temp_path(path);
        std::fs::File::create(&tmp).with_context(|| {
            format!("{}: cannot write (checked before starting)", path.display())
        })?;
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(())
}

/// The model path given, else the embedded default model `builtin:{name}`.
pub fn or_builtin(path: Option<&Path>, name: &str) -> PathBuf {
    path.map_or_else(
        || PathBuf::from(format!("builtin:{name}")),
        Path::to_path_buf,
    )
}

/// A model file, or an embedded default model by name: `builtin:fashion` (signal) or `builtin:digits` (noise).
pub fn load_model(path: &Path) -> Result<ModelFile> {
    if let Some(name) = path.to_str().and_then(|p| p.strip_prefix("builtin:")) {
        return jointdiff_core::defaults::by_name(name)
            .ok_or_else(|| {
                anyhow!("no embedded model '{name}': the embedded models are builtin:fashion and builtin:digits")
            })?
            .map_err(|e| anyhow!("embedded model {name}: {e}"));
    }
    let bytes = read_bytes(path)?;
    ModelFile::from_bytes(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Display range of a signed map (noise): symmetric around 0.
pub fn symmetric_range(t: &Tensor) -> [f32; 2] {
    let m = t.data.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    [-m, m]
}

/// Display range `[0, max]` of a non-negative map (standard deviation).
pub fn positive_range(t: &Tensor) -> [f32; 2] {
    [0.0, t.data.iter().fold(1e-6f32, |m, v| m.max(*v))]
}

/// Writes rows of image batches as one PNG grid: row r, column i is item i of `rows[r]`.
/// Row values are clipped to the row's range and mapped to 0..255; 1 channel gives gray, 3 give RGB.
/// Images smaller than 64 pixels are enlarged (nearest neighbour) so that they can be seen.
pub fn write_png_grid(
    path: &Path,
    rows: &[(&Tensor, [f32; 2])],
    cols: Option<usize>,
) -> Result<()> {
    let pad = 2usize;
    let [_, c, h0, w0] = rows[0].0.shape;
    let zoom = if h0.max(w0) < 64 {
        (64 / h0.max(w0).max(1)).clamp(1, 4)
    } else {
        1
    };
    let (h, w) = (h0 * zoom, w0 * zoom);
    let rgb = c == 3;
    // Lay each row's items out in `per` columns (wrapping long rows).
    let per = cols
        .unwrap_or_else(|| rows.iter().map(|r| r.0.shape[0]).max().unwrap_or(1))
        .max(1);
    let mut lines: Vec<(usize, usize, usize)> = Vec::new(); // (row, first item, count)
    for (r, (t, _)) in rows.iter().enumerate() {
        if t.shape[1..] != rows[0].0.shape[1..] {
            bail!(
                "{}: cannot put images of different shapes in one grid",
                path.display()
            );
        }
        let mut i = 0;
        while i < t.shape[0] {
            lines.push((r, i, per.min(t.shape[0] - i)));
            i += per;
        }
    }
    let gw = per * (w + pad) + pad;
    let gh = lines.len() * (h + pad) + pad;
    let mut buf = vec![255u8; gw * gh * 3];
    for (li, &(r, first, count)) in lines.iter().enumerate() {
        let (t, range) = rows[r];
        let scale = 255.0 / (range[1] - range[0]).max(1e-12);
        for k in 0..count {
            let item = t.item(first + k);
            let (ox, oy) = (pad + k * (w + pad), pad + li * (h + pad));
            for y in 0..h {
                for x in 0..w {
                    let px = |ch: usize| {
                        let v = item[ch * h0 * w0 + (y / zoom) * w0 + x / zoom];
                        ((v.clamp(range[0], range[1]) - range[0]) * scale).round() as u8
                    };
                    let o = ((oy + y) * gw + ox + x) * 3;
                    if rgb {
                        buf[o] = px(0);
                        buf[o + 1] = px(1);
                        buf[o + 2] = px(2);
                    } else {
                        let g = px(0);
                        buf[o..o + 3].copy_from_slice(&[g, g, g]);
                    }
                }
            }
        }
    }
    write_png_rgb(path, &buf, gw, gh)
}

/// Writes an 8-bit RGB buffer (`w * h * 3` bytes, row-major) as a PNG, whole or not at all.
pub fn write_png_rgb(path: &Path, rgb: &[u8], w: usize, h: usize) -> Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut png,
        rgb,
        w as u32,
        h as u32,
        image::ColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("{}: cannot encode PNG", path.display()))?;
    write_atomic(path, &png.into_inner())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_png_header_claiming_more_than_its_bytes_hold_is_refused_before_decoding() {
        // the fuzzer's finding with correct checksums (the fuzz build skips them): a header that claims a
        // 33554432 x 4 RGBA image, which the decoder allocated (512 MB) before reading data
        let bomb = include_bytes!("../../../fixtures/data/png_huge_header.png");
        let e = super::decode_png(bomb).unwrap_err();
        assert!(
            e.contains("33554432x4") && e.contains("truncated or corrupt"),
            "{e}"
        );
        // a real image within both bounds still reads: 300 x 200 gray, a gradient
        let img = image::GrayImage::from_fn(300, 200, |x, y| image::Luma([(x / 2 + y / 2) as u8]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let t = super::decode_png(&png).unwrap();
        assert_eq!(t.shape, [1, 1, 200, 300]);
        assert_eq!(t.data[299], 149.0 / 255.0);
        // a flat image compresses far more than a photograph and stays within deflate's ratio: 2000 x 2000
        // black, a few KB of file for 4 MB of pixels
        let flat = image::GrayImage::new(2000, 2000);
        let mut png = Vec::new();
        flat.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(super::decode_png(&png).unwrap().shape, [1, 1, 2000, 2000]);
        // larger than the tool reads: 5000 x 5000 RGB (75 MB decoded)
        let big = image::RgbImage::new(5000, 5000);
        let mut png = Vec::new();
        big.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = super::decode_png(&png).unwrap_err();
        assert!(
            e.contains("5000x5000") && e.contains("resize it first"),
            "{e}"
        );
    }
}

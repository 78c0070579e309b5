//! `.npy` arrays (format versions 1-3) parsed from and written to byte slices.
//!
//! Reads little-endian float32, float64 and uint8 (C order) into f32; writes float32.
//! A small hand-written parser because the npy crates need `std::io`; the format is a 10-line header.
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, Tensor};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// An array as stored: its shape (any rank) and its values as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// The file stored uint8 (0..255); images from such files are usually scaled by 1/255 by the caller.
    pub uint8: bool,
}

#[derive(Clone, Copy)]
enum Descr {
    F4,
    F8,
    U1,
}

fn header_value<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let pat = format!("'{key}':");
    let i = header
        .find(&pat)
        .ok_or_else(|| Error::format(format!("npy header has no '{key}' entry")))?;
    Ok(header[i + pat.len()..].trim_start())
}

impl NpyArray {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
            return Err(Error::format("not an npy file (bad magic)"));
        }
        let major = bytes[6];
        let (hlen, start): (usize, usize) = match major {
            1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
            2 | 3 => {
                if bytes.len() < 12 {
                    return Err(Error::format("truncated npy header"));
                }
                (
                    u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                    12,
                )
            }
            v => return Err(Error::format(format!("unsupported npy version {v}"))),
        };
        let end = start
            .checked_add(hlen)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| Error::format("truncated npy header"))?;
        let header = core::str::from_utf8(&bytes[start..end])
            .map_err(|_| Error::format("npy header is not text"))?;
        let descr_s = header_value(header, "descr")?;
        let descr = if descr_s.starts_with("'<f4'") {
            Descr::F4
        } else if descr_s.starts_with("'<f8'") {
            Descr::F8
        } else if descr_s.starts_with("'|u1'") || descr_s.starts_with("'<u1'") {
            Descr::U1
        } else {
            // the quoted value alone ('<i4'), not what follows it in the header
            let d: String = match descr_s.char_indices().skip(1).find(|(_, c)| *c == '\'') {
                Some((end, _)) => String::from(&descr_s[..=end]),
                None => descr_s.chars().take(8).collect(),
            };
            return Err(Error::format(format!(
                "unsupported npy dtype {d}; expected float32 ('<f4'), float64 ('<f8') or uint8 ('|u1')"
            )));
        };
        let fo = header_value(header, "fortran_order")?;
        if !fo.starts_with("False") {
            return Err(Error::format(
                "npy array is in Fortran order; save it in C order",
            ));
        }
        let sh = header_value(header, "shape")?;
        let open = sh
            .strip_prefix('(')
            .ok_or_else(|| Error::format("npy shape is not a tuple"))?;
        let close = open
            .find(')')
            .ok_or_else(|| Error::format("npy shape is not a tuple"))?;
        let mut shape = Vec::new();
        for part in open[..close].split(',') {
            let p = part.trim();
            if p.is_empty() {
                continue;
            }
            let v: usize = p
                .parse()
                .map_err(|_| Error::format(format!("npy shape entry '{p}' is not a number")))?;
            shape.push(v);
        }
        let n = checked_numel(&shape)?;
        let esize = match descr {
            Descr::F4 => 4,
            Descr::F8 => 8,
            Descr::U1 => 1,
        };
        let need = n
            .checked_mul(esize)
            .ok_or_else(|| Error::format("npy array is too large"))?;
        let body = &bytes[end..];
        if body.len() < need {
            return Err(Error::format(format!(
                "truncated npy data: shape {shape:?} needs {need} bytes, file has {}",
                body.len()
            )));
        }
        let body = &body[..need];
        let data: Vec<f32> = match descr {
            Descr::F4 => body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Descr::F8 => body
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            Descr::U1 => body.iter().map(|&b| b as f32).collect(),
        };
        Ok(NpyArray {
            shape,
            data,
            uint8: matches!(descr, Descr::U1),
        })
    }

    /// The array's shape read as images: HW -> [1,1,H,W], CHW -> [1,C,H,W], NCHW as is.
    pub fn nchw_shape(&self) -> Result<[usize; 4]> {
        match self.shape[..] {
            [h, w] => Ok([1, 1, h, w]),
            [c, h, w] => Ok([1, c, h, w]),
            [n, c, h, w] => Ok([n, c, h, w]),
            _ => Err(Error::shape(format!(
                "array of shape {:?} is not an image batch (HW, CHW or NCHW)",
                self.shape
            ))),
        }
    }

    /// Interprets the array as images ([`NpyArray::nchw_shape`]).
    pub fn into_nchw(self) -> Result<Tensor> {
        Tensor::from_vec(self.nchw_shape()?, self.data)
    }

    /// Serialises f32 values of any shape as npy version 1.0.
    pub fn to_bytes(shape: &[usize], data: &[f32]) -> Vec<u8> {
        let mut dims = String::new();
        for (i, d) in shape.iter().enumerate() {
            dims.push_str(&format!("{d}"));
            if i + 1 < shape.len() || shape.len() == 1 {
                dims.push(',');
            }
            if i + 1 < shape.len() {
                dims.push(' ');
            }
        }
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({dims}), }}");
        // pad so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64
        let total = 10 + header.len() + 1;
        let pad = (64 - total % 64) % 64;
        for _ in 0..pad {
            header.push(' ');
        }
        header.push('\n');
        let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for v in data {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn roundtrip_and_errors() {
        let b = NpyArray::to_bytes(
            &[2, 1, 2, 3],
            &[1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.],
        );
        assert_eq!((b.len() - 48) % 64, 0); // header is 64-aligned, 48 data bytes follow
        let a = NpyArray::parse(&b).unwrap();
        assert_eq!(a.shape, vec![2, 1, 2, 3]);
        assert_eq!(a.data[11], 12.0);
        assert!(NpyArray::parse(&b[..b.len() - 1])
            .unwrap_err()
            .message
            .contains("truncated"));
        assert!(NpyArray::parse(b"hello world").is_err());
        let one = NpyArray::to_bytes(&[3], &[1., 2., 3.]);
        assert_eq!(NpyArray::parse(&one).unwrap().shape, vec![3]);
    }

    /// A header exactly as numpy 1.x/2.x writes it for `np.arange(6, dtype=np.uint8).reshape(2, 3)`.
    #[test]
    fn parses_numpy_written_uint8() {
        let mut b = Vec::new();
        b.extend_from_slice(b"\x93NUMPY\x01\x00");
        let h = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 3), }";
        let mut hs = String::from(h);
        while (10 + hs.len() + 1) % 64 != 0 {
            hs.push(' ');
        }
        hs.push('\n');
        b.extend_from_slice(&(hs.len() as u16).to_le_bytes());
        b.extend_from_slice(hs.as_bytes());
        b.extend_from_slice(&[0, 1, 2, 3, 4, 255]);
        let a = NpyArray::parse(&b).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data, vec![0., 1., 2., 3., 4., 255.]);
        let t = a.into_nchw().unwrap();
        assert_eq!(t.shape, [1, 1, 2, 3]);
    }
}

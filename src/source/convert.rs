//! Pixel formats cameras and recordings deliver, converted to packed RGB: rgb8, bgr8, mono8,
//! YUYV / UYVY (4:2:2, BT.601 limited range, as V4L2 and ROS deliver them), JPEG and PNG.

use image::RgbImage;

/// Raw pixel layouts this runtime reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Rgb8,
    Bgr8,
    Mono8,
    /// Y0 U Y1 V (V4L2 YUYV, ROS `yuv422_yuy2`).
    Yuyv,
    /// U Y0 V Y1 (ROS `yuv422`).
    Uyvy,
}

impl PixelFormat {
    /// From a ROS / Foxglove encoding string.
    pub fn from_encoding(enc: &str) -> Option<Self> {
        Some(match enc.to_ascii_lowercase().as_str() {
            "rgb8" => Self::Rgb8,
            "bgr8" => Self::Bgr8,
            "mono8" | "8uc1" => Self::Mono8,
            "yuyv" | "yuv422_yuy2" | "yuy2" => Self::Yuyv,
            "yuv422" | "uyvy" => Self::Uyvy,
            _ => return None,
        })
    }

    fn bytes_per_pixel(self) -> usize {
        match self {
            Self::Rgb8 | Self::Bgr8 => 3,
            Self::Mono8 => 1,
            Self::Yuyv | Self::Uyvy => 2,
        }
    }
}

/// Converts one raw frame; `step` is the row stride in bytes (0: tightly packed).
pub fn raw_to_rgb(
    data: &[u8],
    width: u32,
    height: u32,
    step: usize,
    fmt: PixelFormat,
) -> Result<RgbImage, String> {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 {
        return Err(format!("empty frame {width}x{height}"));
    }
    if matches!(fmt, PixelFormat::Yuyv | PixelFormat::Uyvy) && w % 2 != 0 {
        return Err(format!("4:2:2 frame needs an even width, got {width}"));
    }
    let row = w * fmt.bytes_per_pixel();
    let step = if step == 0 { row } else { step };
    if step < row {
        return Err(format!(
            "row step {step} is shorter than {row} bytes for {width} pixels"
        ));
    }
    let need = step
        .checked_mul(h - 1)
        .and_then(|n| n.checked_add(row))
        .unwrap_or(usize::MAX);
    if data.len() < need {
        return Err(format!(
            "{} bytes, {width}x{height} {fmt:?} needs {need}",
            data.len()
        ));
    }
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        let src = &data[y * step..y * step + row];
        let dst = &mut out[y * w * 3..(y + 1) * w * 3];
        match fmt {
            PixelFormat::Rgb8 => dst.copy_from_slice(src),
            PixelFormat::Bgr8 => {
                for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(3)) {
                    d.copy_from_slice(&[s[2], s[1], s[0]]);
                }
            }
            PixelFormat::Mono8 => {
                for (d, &s) in dst.chunks_exact_mut(3).zip(src) {
                    d.copy_from_slice(&[s, s, s]);
                }
            }
            PixelFormat::Yuyv | PixelFormat::Uyvy => {
                for (d, s) in dst.chunks_exact_mut(6).zip(src.chunks_exact(4)) {
                    let (y0, u, y1, v) = if fmt == PixelFormat::Yuyv {
                        (s[0], s[1], s[2], s[3])
                    } else {
                        (s[1], s[0], s[3], s[2])
                    };
                    d[..3].copy_from_slice(&yuv_to_rgb(y0, u, v));
                    d[3..].copy_from_slice(&yuv_to_rgb(y1, u, v));
                }
            }
        }
    }
    Ok(RgbImage::from_raw(width, height, out).expect("sized above"))
}

/// BT.601 limited range in 8.8 fixed point.
#[inline]
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = y as i32 - 16;
    let d = u as i32 - 128;
    let e = v as i32 - 128;
    let clip = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clip(298 * c + 409 * e),
        clip(298 * c - 100 * d - 208 * e),
        clip(298 * c + 516 * d),
    ]
}

/// Decodes a compressed frame (JPEG / MJPEG, PNG).
/// The largest frame side decoded: 8K cameras fit, a corrupt header cannot make one frame
/// take seconds and hundreds of megabytes.
pub const MAX_SIDE: u32 = 8192;

pub fn decode_compressed(data: &[u8]) -> Result<RgbImage, String> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| format!("cannot decode compressed image: {e}"))?;
    reader.limits(limits);
    reader
        .decode()
        .map(|i| i.to_rgb8())
        .map_err(|e| format!("cannot decode compressed image: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BT.601 limited range in floating point: the textbook formula.
    fn reference(y: u8, u: u8, v: u8) -> [f64; 3] {
        let (y, u, v) = (
            1.164 * (y as f64 - 16.0),
            u as f64 - 128.0,
            v as f64 - 128.0,
        );
        [y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u].map(|x| x.clamp(0.0, 255.0))
    }

    #[test]
    fn yuyv_and_uyvy_match_the_reference_formula() {
        // A recorded-style 4x2 buffer: grey, saturated colours, black and white.
        let yuyv: [u8; 16] = [
            128, 128, 200, 128, 81, 90, 145, 54, 41, 240, 16, 110, 235, 128, 16, 128,
        ];
        let img = raw_to_rgb(&yuyv, 4, 2, 0, PixelFormat::Yuyv).unwrap();
        let mut uyvy = yuyv;
        for q in uyvy.chunks_exact_mut(4) {
            q.swap(0, 1);
            q.swap(2, 3);
        }
        assert_eq!(raw_to_rgb(&uyvy, 4, 2, 0, PixelFormat::Uyvy).unwrap(), img);
        for (i, q) in yuyv.chunks_exact(4).enumerate() {
            for (k, y) in [q[0], q[2]].into_iter().enumerate() {
                let px = img.get_pixel(((i * 2 + k) % 4) as u32, ((i * 2 + k) / 4) as u32);
                let r = reference(y, q[1], q[3]);
                for c in 0..3 {
                    assert!(
                        (px[c] as f64 - r[c]).abs() <= 1.5,
                        "pixel {i}/{k}: {:?} vs {r:?}",
                        px.0
                    );
                }
            }
        }
    }

    #[test]
    fn bgr_mono_and_stride_are_honoured() {
        let bgr = [1u8, 2, 3, 4, 5, 6, 99, 99, 7, 8, 9, 10, 11, 12, 99, 99];
        let img = raw_to_rgb(&bgr, 2, 2, 8, PixelFormat::Bgr8).unwrap();
        assert_eq!(img.as_raw(), &[3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
        let img = raw_to_rgb(&[7, 9], 2, 1, 0, PixelFormat::Mono8).unwrap();
        assert_eq!(img.as_raw(), &[7, 7, 7, 9, 9, 9]);
        let e = raw_to_rgb(&[0u8; 5], 2, 2, 0, PixelFormat::Rgb8).unwrap_err();
        assert!(e.contains("needs 12"), "{e}");
    }

    #[test]
    fn mjpeg_frame_decodes_close_to_its_source() {
        let mut src = RgbImage::new(32, 16);
        for (x, y, p) in src.enumerate_pixels_mut() {
            *p = image::Rgb([(x * 8) as u8, (y * 16) as u8, 128]);
        }
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&src)
            .unwrap();
        let back = decode_compressed(&jpeg).unwrap();
        let err: f64 = back
            .as_raw()
            .iter()
            .zip(src.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / src.as_raw().len() as f64;
        assert!(err < 3.0, "mean abs error {err}");
        assert!(decode_compressed(b"garbage").is_err());
    }
}

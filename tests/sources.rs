//! Frame sources against committed fixtures: MCAP written by the Python `mcap` tools (ROS 2 and
//! Foxglove), by `segadapt record`, and a truncated file; raw pipes; bad input.

use segadapt::source::{open, Frame, FrameSource, PipeSource, SourceOptions};
use std::path::PathBuf;

const W: u32 = 8;
const H: u32 = 6;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name)
}

/// The pattern make_mcap.py writes: red along x, green along y, blue with the frame index.
fn pattern(x: u32, y: u32, k: u64) -> [u8; 3] {
    [(x * 30) as u8, (y * 40) as u8, (60 + 50 * (k % 3)) as u8]
}

fn frames(spec: &str) -> (Vec<Frame>, Vec<String>, Vec<String>) {
    let mut src = open(spec, &SourceOptions::default()).unwrap();
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    while let Some(r) = src.next_frame() {
        match r {
            Ok(f) => ok.push(f),
            Err(e) => bad.push(e.to_string()),
        }
    }
    let damage = src.damage();
    (ok, bad, damage)
}

fn assert_pattern(f: &Frame, k: u64, tol: i32, grey: bool) {
    assert_eq!(f.image.dimensions(), (W, H), "{}", f.name);
    for (x, y, p) in f.image.enumerate_pixels() {
        let want = pattern(x, y, k);
        let want = if grey { [want[1]; 3] } else { want };
        for c in 0..3 {
            let d = (p[c] as i32 - want[c] as i32).abs();
            assert!(
                d <= tol,
                "{} frame {k} pixel ({x},{y}): {:?} vs {want:?}",
                f.name,
                p.0
            );
        }
    }
}

#[test]
fn ros2_images_written_by_python_mcap() {
    let file = fixture("ros2_images.mcap");
    for (topic, tol, grey) in [
        ("/rgb8", 0, false),
        ("/bgr8", 0, false),
        ("/mono8", 0, true),
        ("/yuv422", 24, false), // 4:2:2 chroma is shared by pixel pairs
        ("/jpeg", 24, false),
        ("/png", 0, false),
    ] {
        let (ok, bad, damage) = frames(&format!("mcap:{}#{topic}", file.display()));
        assert!(
            bad.is_empty() && damage.is_empty(),
            "{topic}: {bad:?} {damage:?}"
        );
        assert_eq!(ok.len(), 3, "{topic}");
        for (k, f) in ok.iter().enumerate() {
            assert_eq!(f.seq, k as u64);
            assert_eq!(f.timestamp_ns, 100_000_000_000 + k as u64 * 66_666_666);
            assert_pattern(f, k as u64, tol, grey);
        }
    }
    // Without a topic, the first image topic in the file is played.
    let (ok, _, _) = frames(&format!("mcap:{}", file.display()));
    assert_eq!(ok.len(), 3);
    assert!(ok[0].name.starts_with("/rgb8#"));
}

#[test]
fn foxglove_images_written_by_python_mcap() {
    let file = fixture("foxglove_images.mcap");
    for (topic, tol) in [("/fox_raw", 0), ("/fox_jpeg", 24)] {
        let (ok, bad, _) = frames(&format!("mcap:{}#{topic}", file.display()));
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(ok.len(), 3, "{topic}");
        for (k, f) in ok.iter().enumerate() {
            assert_pattern(f, k as u64, tol, false);
        }
    }
}

#[test]
fn recorded_and_truncated_files_by_segadapt_record() {
    let (ok, bad, damage) = frames(&format!("mcap:{}", fixture("recorded.mcap").display()));
    assert!(bad.is_empty() && damage.is_empty(), "{bad:?} {damage:?}");
    assert_eq!(ok.len(), 5);
    for (k, f) in ok.iter().enumerate() {
        assert_pattern(f, k as u64, 24, false);
        assert_eq!(f.timestamp_ns, k as u64 * 66_666_666); // 15 fps folder timestamps
    }
    // The truncated copy (first 60% of the bytes): every whole frame is read, damage reported.
    let (ok, bad, damage) = frames(&format!("mcap:{}", fixture("truncated.mcap").display()));
    assert!(!ok.is_empty() && ok.len() < 5, "{} frames", ok.len());
    assert!(bad.is_empty(), "{bad:?}");
    assert!(!damage.is_empty(), "truncation must be reported");
    for (k, f) in ok.iter().enumerate() {
        assert_pattern(f, k as u64, 24, false);
    }
}

#[test]
fn record_round_trips_through_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("again.mcap");
    let (ok, _, _) = frames(&format!(
        "mcap:{}#/png",
        fixture("ros2_images.mcap").display()
    ));
    let mut rec = segadapt::source::McapRecorder::create(&out, "/cam").unwrap();
    for f in &ok {
        rec.write(f).unwrap();
    }
    assert_eq!(rec.finish().unwrap(), 3);
    let (back, _, damage) = frames(&format!("mcap:{}#/cam", out.display()));
    assert!(damage.is_empty());
    assert_eq!(back.len(), 3);
    for (k, f) in back.iter().enumerate() {
        assert_pattern(f, k as u64, 24, false);
        assert_eq!(f.timestamp_ns, ok[k].timestamp_ns);
    }
}

#[test]
fn pipe_reads_whole_frames_and_reports_a_cut_one() {
    let frame: Vec<u8> = (0..W * H).flat_map(|i| [i as u8, 0, 255]).collect();
    let mut bytes = frame.repeat(2);
    bytes.extend(&frame[..10]);
    let mut p = PipeSource::new(
        "pipe:8x6:bgr24",
        "8x6:bgr24",
        Box::new(std::io::Cursor::new(bytes)),
    )
    .unwrap();
    for _ in 0..2 {
        let f = p.next_frame().unwrap().unwrap();
        assert_eq!(f.image.get_pixel(1, 0).0, [255, 0, 1]);
    }
    let e = p.next_frame().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("pipe:8x6:bgr24") && e.contains("frame 2") && e.contains("10 of 144"),
        "{e}"
    );
    assert!(p.next_frame().is_none());
    let e = PipeSource::new("pipe:8x6:yuv", "8x6:yuv", Box::new(std::io::empty()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown pixel format"), "{e}");
}

#[test]
fn bad_input_names_the_source_and_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    image::RgbImage::new(4, 4)
        .save(dir.path().join("images/a.png"))
        .unwrap();
    std::fs::write(
        dir.path().join("images/b.jpg"),
        b"\xff\xd8\xff\xe0 not a jpeg",
    )
    .unwrap();
    image::RgbImage::new(4, 4)
        .save(dir.path().join("images/c.png"))
        .unwrap();
    let spec = format!("folder:{}", dir.path().display());
    let (ok, bad, _) = frames(&spec);
    assert_eq!(
        ok.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0].contains(&spec) && bad[0].contains("frame b") && bad[0].contains("b.jpg"),
        "{}",
        bad[0]
    );

    let e = open("mcap:/no/such/file.mcap", &SourceOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/file.mcap"), "{e}");
    let e = open("camera0", &SourceOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("KIND:ARGS"), "{e}");
    let e = open(
        &format!("mcap:{}", fixture("parity.safetensors").display()),
        &SourceOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not an MCAP file"), "{e}");
    let e = segadapt::source::convert::raw_to_rgb(
        &[0; 10],
        8,
        6,
        0,
        segadapt::source::convert::PixelFormat::Rgb8,
    )
    .unwrap_err();
    assert!(e.contains("needs 144"), "{e}");
}

#[test]
fn a_missing_camera_is_named_in_the_error() {
    let e = open("v4l:/dev/video-does-not-exist", &SourceOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("v4l:/dev/video-does-not-exist"), "{e}");
    assert!(e.contains("/dev/video-does-not-exist"), "{e}");
}

#[test]
fn a_looped_source_replays_with_rising_sequence_and_time() {
    let spec = format!("mcap:{}", fixture("recorded.mcap").display());
    let opts = SourceOptions {
        fps: 15.0,
        ..Default::default()
    };
    let mut src = segadapt::source::Looped::open(&spec, &opts, 3).unwrap();
    let mut got = Vec::new();
    while let Some(f) = src.next_frame() {
        got.push(f.unwrap());
    }
    assert_eq!(got.len(), 15);
    assert!(got
        .windows(2)
        .all(|w| w[1].seq == w[0].seq + 1 && w[1].timestamp_ns > w[0].timestamp_ns));
    assert_eq!(got[5].timestamp_ns, got[4].timestamp_ns + 66_666_666);
}

/// Regression inputs of the fuzzer (`cargo bench --bench fuzz`): each once aborted the process
/// or held a frame up for seconds, and must now come back as a clear error.
#[test]
fn inputs_the_fuzzer_found_are_errors_not_aborts() {
    // A compressed chunk whose first record claims 650 PB (tests/fixtures/make_mcap.py
    // makes it): the mcap crate's message stream reserved that much and aborted.
    let p = fixture("huge-record.mcap");
    let (got, errors, damage) = frames(&format!("mcap:{}", p.display()));
    assert!(got.is_empty() && errors.is_empty(), "{errors:?}");
    assert!(
        damage.iter().any(|d| d.contains("exceeds limit")),
        "{damage:?}"
    );

    // A pipe size that would need exabytes per frame.
    let err = PipeSource::new(
        "pipe",
        "4294967295x4294967295:rgb24",
        Box::new(std::io::empty()),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("at most 8192x8192"), "{err}");

    // A PNG header claiming 100000x100000 pixels.
    let mut png = Vec::new();
    image::RgbImage::new(2, 2)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    // IHDR's CRC over its type and data, so only the size is wrong.
    let crc = !png[12..29].iter().fold(!0u32, |mut c, &byte| {
        c ^= byte as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
        c
    });
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let t0 = std::time::Instant::now();
    let err = segadapt::source::convert::decode_compressed(&png).unwrap_err();
    assert!(err.contains("cannot decode"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_millis(500));
}

//! `cargo bench --bench content`: what the serving path's content check (`data::has_content`)
//! costs per frame, against the preprocessing every served frame goes through anyway (resize to
//! the model's input and conversion to a normalised tensor), both timed in the same run.

use image::{Rgb, RgbImage};

/// Median wall time of `f` in microseconds over 201 runs.
fn median_us(mut f: impl FnMut()) -> f64 {
    let t = segadapt::bench::timing(0, 201, || {
        f();
        Ok(())
    });
    t.expect("an infallible closure").median_ms * 1e3
}

fn main() {
    let pre = segadapt::config::PreprocessConfig::with_size(Some((240, 180)));
    println!("frame        content check   preprocessing   ratio   (medians of 201, µs)");
    for (w, h) in [(240, 180), (960, 720), (1920, 1080)] {
        let img = RgbImage::from_fn(w, h, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
        let check = median_us(|| {
            std::hint::black_box(segadapt::data::has_content(std::hint::black_box(&img)));
        });
        let prep = median_us(|| {
            let small = segadapt::data::resize_rgb(&img, 240, 180);
            let t = segadapt::data::image_to_tensor(&small, &pre, &candle_core::Device::Cpu);
            std::hint::black_box(t.expect("a frame converts"));
        });
        println!(
            "{:<12} {check:>13.1} {prep:>15.1} {:>7.4}",
            format!("{w}x{h}"),
            check / prep
        );
    }
}

//! A fuzzing driver that runs on stable Rust: each target takes arbitrary bytes into one of the
//! runtime's parsers (frames, recordings, pipes, profiles, model files, label maps) and must
//! answer with a value or an error, never a panic. Inputs are mutated from seed corpora (bit
//! flips, interesting bytes, insertions, deletions, truncation, splices, and for text targets
//! number swaps); an input whose error reads differently from every one seen before joins the
//! corpus, a crude stand-in for coverage that steers towards new parser paths.

mod targets;

pub use targets::{target, Target, TARGETS};

use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What one target's run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub executions: u64,
    /// Inputs that panicked, written under the crash folder.
    pub crashes: Vec<PathBuf>,
    pub corpus: usize,
    /// Distinct error messages seen (their words, without numbers or quoted values).
    pub errors: usize,
    pub slowest_ms: f64,
}

/// Runs `t` for `time` from its seeds, writing crashing inputs under `crash_dir`.
pub fn run(t: &Target, time: Duration, seed: u64, crash_dir: &Path) -> std::io::Result<Outcome> {
    let scratch = tempfile::tempdir()?;
    let mut corpus: Vec<Vec<u8>> = (t.seeds)();
    corpus.push(Vec::new());
    let mut rng = crate::SeededRng::seed_from_u64(seed);
    let mut seen = HashSet::new();
    let mut out = Outcome::default();
    let quiet = silence_panics();
    let start = Instant::now();
    while start.elapsed() < time {
        let base = &corpus[rng.random_range(0..corpus.len())];
        let other = &corpus[rng.random_range(0..corpus.len())];
        let input = mutate(base, other, t.text, &mut rng);
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(|| (t.run)(&input, scratch.path()));
        out.slowest_ms = out.slowest_ms.max(t0.elapsed().as_secs_f64() * 1e3);
        out.executions += 1;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                // Words only: a message that differs in a count or a quoted value is no new
                // path.
                let words: Vec<&str> = msg
                    .split_whitespace()
                    .filter(|w| w.chars().all(|c| c.is_ascii_alphabetic()))
                    .take(6)
                    .collect();
                let key = words.join(" ");
                if seen.insert(key) && corpus.len() < 4096 {
                    corpus.push(input);
                }
            }
            Err(_) => {
                std::fs::create_dir_all(crash_dir)?;
                let p = crash_dir.join(format!("{}-{}.bin", t.name, out.crashes.len()));
                std::fs::write(&p, &input)?;
                out.crashes.push(p);
            }
        }
    }
    drop(quiet);
    out.corpus = corpus.len();
    out.errors = seen.len();
    Ok(out)
}

/// Replaces the panic hook with a silent one until the guard drops, then puts the one before
/// back: a crash is recorded as an input, not printed thousands of times.
fn silence_panics() -> impl Drop {
    type Hook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;
    struct Restore(Option<Hook>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(hook) = self.0.take() {
                std::panic::set_hook(hook);
            }
        }
    }
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    Restore(Some(before))
}

/// Numbers a text mutation swaps in: the edges parsers get wrong.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "255",
    "256",
    "65535",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "-1e309",
    "NaN",
    "inf",
    "0.0",
    "-0",
    "99999999999",
    "0x10",
];

/// One mutated input from `base`, sometimes spliced with `other`.
fn mutate(base: &[u8], other: &[u8], text: bool, rng: &mut impl Rng) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let n = v.len();
        match rng.random_range(0..if text { 9 } else { 8 }) {
            0 if n > 0 => {
                let i = rng.random_range(0..n);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if n > 0 => {
                let i = rng.random_range(0..n);
                v[i] = [0, 0xff, 0x7f, 0x80, 1, b'\n', b'"', b'='][rng.random_range(0..8)];
            }
            2 => {
                let i = rng.random_range(0..=n);
                let k = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..k).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if n > 0 => {
                let i = rng.random_range(0..n);
                let k = rng.random_range(1..=(n - i).min(64));
                v.drain(i..i + k);
            }
            4 if n > 0 => v.truncate(rng.random_range(0..n)),
            5 if n > 0 && !other.is_empty() => {
                let i = rng.random_range(0..n);
                let j = rng.random_range(0..other.len());
                let k = rng.random_range(1..=(other.len() - j).min(256));
                v.splice(i..i, other[j..j + k].iter().copied());
            }
            6 if n >= 4 => {
                // A little-endian length or count field set to an edge value.
                let i = rng.random_range(0..n - 3);
                let x: u32 = [0, 1, 0xffff_ffff, 0x7fff_ffff, 0x1000_0000][rng.random_range(0..5)];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            7 if n > 0 => {
                let i = rng.random_range(0..n);
                let k = rng.random_range(1..=(n - i).min(64));
                let chunk = v[i..i + k].to_vec();
                v.splice(i..i, chunk);
            }
            8 => swap_number(&mut v, rng),
            _ => {}
        }
    }
    v
}

/// Replaces one run of digits in `v` with an edge-case number.
fn swap_number(v: &mut Vec<u8>, rng: &mut impl Rng) {
    let starts: Vec<usize> = (0..v.len())
        .filter(|&i| v[i].is_ascii_digit() && (i == 0 || !v[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let i = starts[rng.random_range(0..starts.len())];
    let end = (i..v.len())
        .find(|&j| !v[j].is_ascii_digit())
        .unwrap_or(v.len());
    let n = NUMBERS[rng.random_range(0..NUMBERS.len())];
    v.splice(i..end, n.bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_change_inputs_and_a_panicking_target_is_caught() {
        let mut rng = crate::SeededRng::seed_from_u64(1);
        let base = b"width = 240\nheight = 180\n".to_vec();
        let changed = (0..50)
            .filter(|_| mutate(&base, &base, true, &mut rng) != base)
            .count();
        assert!(changed > 40, "{changed} of 50 mutated");
        let t = Target {
            name: "panics-on-z",
            text: false,
            seeds: || vec![b"abc".to_vec()],
            run: |b, _| match b.contains(&b'z') {
                true => panic!("z"),
                false => Err(format!("no z in {} bytes", b.len())),
            },
        };
        let dir = tempfile::tempdir().unwrap();
        let o = run(&t, Duration::from_millis(300), 2, dir.path()).unwrap();
        assert!(o.executions > 100, "{o:?}");
        assert!(!o.crashes.is_empty(), "a z is found: {o:?}");
        assert!(std::fs::read(&o.crashes[0]).unwrap().contains(&b'z'));
    }
}

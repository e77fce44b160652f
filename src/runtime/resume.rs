//! Where a run was when it saved a checkpoint, so a restarted replay continues the drive from
//! the next frame with the same random stream and the same frames to train from, and ends as
//! the uninterrupted run would have. A live camera has no past to skip: it simply goes on.

use crate::source::FrameSource;
use crate::SeededRng;
use image::RgbImage;
use std::collections::HashMap;

const FRAMES: &str = "source.frames";
const SEED: &str = "rng.seed";
const WORD: &str = "rng.word_pos";

/// A run's position: frames served from the source and the random stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub frames: u64,
    pub rng_seed: [u8; 32],
    pub rng_word: u128,
}

impl Position {
    pub fn new(frames: u64, rng: &SeededRng) -> Self {
        Self {
            frames,
            rng_seed: rng.get_seed(),
            rng_word: rng.get_word_pos(),
        }
    }

    /// The random stream exactly where it was.
    pub fn rng(&self) -> SeededRng {
        use rand::SeedableRng;
        let mut r = SeededRng::from_seed(self.rng_seed);
        r.set_word_pos(self.rng_word);
        r
    }

    /// As a checkpoint's string metadata.
    pub fn meta(&self) -> HashMap<String, String> {
        let seed: String = self.rng_seed.iter().map(|b| format!("{b:02x}")).collect();
        HashMap::from([
            (FRAMES.to_string(), self.frames.to_string()),
            (SEED.to_string(), seed),
            (WORD.to_string(), self.rng_word.to_string()),
        ])
    }

    /// From a checkpoint's metadata; None where it holds no position (the first checkpoint, or
    /// one written by an older build), and the run starts from the beginning of the drive.
    pub fn from_meta(meta: &HashMap<String, String>) -> Option<Self> {
        let hex = meta.get(SEED)?;
        if hex.len() != 64 {
            return None;
        }
        let mut rng_seed = [0u8; 32];
        for (i, b) in rng_seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self {
            frames: meta.get(FRAMES)?.parse().ok()?,
            rng_seed,
            rng_word: meta.get(WORD)?.parse().ok()?,
        })
    }
}

/// Reads the first `frames` good frames of a replayed source again without serving them,
/// handing the last `keep` of them to `ring` (the frames training samples from). Returns how
/// many it passed; fewer than `frames` when the source ended first.
pub fn fast_forward(
    source: &mut dyn FrameSource,
    frames: u64,
    keep: usize,
    mut ring: impl FnMut(&RgbImage),
) -> u64 {
    let mut passed = 0u64;
    while passed < frames {
        match source.next_frame() {
            None => break,
            Some(Ok(f)) => {
                passed += 1;
                if passed + keep as u64 > frames {
                    ring(&f.image);
                }
            }
            // Counted and reported when the drive was first played.
            Some(Err(_)) => continue,
        }
    }
    passed
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_position_round_trips_through_metadata_and_the_stream_goes_on() {
        let mut r = SeededRng::seed_from_u64(7);
        let _: Vec<u32> = (0..13).map(|_| r.random()).collect();
        let p = Position::new(42, &r);
        let back = Position::from_meta(&p.meta()).unwrap();
        assert_eq!(back, p);
        let mut restored = back.rng();
        let next: Vec<u64> = (0..5).map(|_| r.random()).collect();
        let again: Vec<u64> = (0..5).map(|_| restored.random()).collect();
        assert_eq!(next, again);
        assert_eq!(Position::from_meta(&HashMap::new()), None);
    }

    #[test]
    fn the_stream_is_rands_standard_one() {
        let mut a = SeededRng::seed_from_u64(3);
        let mut b = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..100 {
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
    }
}

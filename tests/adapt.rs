//! The online adaptation step on a tiny model: every component and baseline runs, its loss term
//! is finite, state stays within its bounds, and the teacher follows the student.

mod common;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use segadapt::adapt::config::Statistics;
use segadapt::adapt::replay::Replay;
use segadapt::adapt::step::Adapter;
use segadapt::adapt::AdaptConfig;
use segadapt::adapt::Method;
use segadapt::config::PreprocessConfig;
use segadapt::data::Dataset;
use segadapt::model::{init_tensors, Segformer, Tracking};
use segadapt::stats::SourceStats;

/// Every component on, sized for the tiny model.
fn full() -> AdaptConfig {
    let mut c = AdaptConfig {
        lr: 1e-4,
        threshold: 0.2,
        ..Default::default()
    };
    c.cpsl.queue = 300;
    c.cpsl.pixels = 128;
    c.bida.ramp = 10;
    c.bida.per_class = 8;
    c.bida.check = true;
    c.dida.bank = 12;
    c.dida.blend = 0.5;
    c.dida.interval = 1;
    c.hpla.pool = 3;
    c.hpla.hard = 2;
    // Random weights give erratic predictions: the monitor has its own test.
    c.guard.collapse = false;
    c.statistics = Statistics::Class;
    c
}

/// A tiny model over a labelled temporary folder of `n` frames of 64x48.
struct Fixture {
    data: tempfile::TempDir,
    examples: Vec<segadapt::data::Example>,
    cfg: segadapt::config::SegformerConfig,
    tensors: segadapt::model::TensorMap,
    pre: PreprocessConfig,
    model: Segformer,
}

fn fixture(n: usize, drop_path: bool) -> Fixture {
    let data = tempfile::tempdir().unwrap();
    common::write_dataset(data.path(), n, 64, 48);
    let examples = Dataset::open(data.path(), &[])
        .unwrap()
        .load_all(3, 255, true);
    let mut cfg = common::tiny_config(3);
    if !drop_path {
        cfg.drop_path_rate = 0.0;
    }
    let tensors = init_tensors(&cfg, &Device::Cpu, 0).unwrap();
    let pre = PreprocessConfig::with_size(Some((64, 48)));
    let model = Segformer::new(&cfg, tensors.clone()).unwrap();
    Fixture {
        data,
        examples,
        cfg,
        tensors,
        pre,
        model,
    }
}

impl Fixture {
    /// The fixture's frames as a source at `fps`.
    fn source(&self, fps: f64) -> Box<dyn segadapt::source::FrameSource> {
        let opts = segadapt::source::SourceOptions {
            fps,
            ..Default::default()
        };
        segadapt::source::open(&format!("folder:{}", self.data.path().display()), &opts).unwrap()
    }

    fn stats(&self) -> SourceStats {
        SourceStats::compute(&self.model, &self.pre, &self.examples, 255).unwrap()
    }

    fn replay(&self, size: usize, rng: &mut segadapt::SeededRng) -> std::sync::Arc<Replay> {
        std::sync::Arc::new(Replay::new(
            &self.examples,
            &self.pre,
            (64, 48),
            size,
            0.01,
            3,
            rng,
        ))
    }
}

#[test]
fn every_variant_steps_with_finite_bounded_state() {
    let fx = fixture(3, true);
    let (cfg, tensors) = (&fx.cfg, &fx.tensors);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 64), &Device::Cpu).unwrap();
    let strong = (&x * 0.9).unwrap();
    let mut variants: Vec<(&str, AdaptConfig)> = Method::ALL
        .iter()
        .filter(|&&m| m != Method::SourceOnly)
        .map(|m| (m.name(), m.config(&full())))
        .collect();
    let mut bida_replay = Method::Bida.config(&full());
    bida_replay.replay.on = true;
    variants.push(("bida with source replay", bida_replay));
    let mut dida_replay = Method::Dida.config(&full());
    dida_replay.replay.on = true;
    variants.push(("dida with source replay", dida_replay));
    variants.push((
        "full, norms only",
        AdaptConfig {
            train: segadapt::adapt::config::TrainScope::Norm,
            ..full()
        },
    ));
    for (name, ac) in variants {
        let stats = fx.stats();
        let mut a = Adapter::new(ac.clone(), cfg, tensors, stats).unwrap();
        if ac.replay.on {
            let mut rng = segadapt::SeededRng::seed_from_u64(0);
            a.replay = Some(fx.replay(2, &mut rng));
        }
        let before = a.teacher.tensors().unwrap()["decode_head.classifier.weight"]
            .copy()
            .unwrap();
        let mut rng = segadapt::SeededRng::seed_from_u64(1);
        let mut r = Default::default();
        for _ in 0..3 {
            r = a.step(&x, &strong, &mut rng).unwrap();
            assert!(r.total.is_finite(), "{name}: {r:?}");
            assert!(r.terms.iter().all(|(_, v)| v.is_finite()), "{name}: {r:?}");
        }
        let r: segadapt::adapt::step::StepReport = r;
        assert_eq!(a.optimizer_steps(), 3, "{name}");
        let after = &a.teacher.tensors().unwrap()["decode_head.classifier.weight"];
        let moved = (after - &before)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if ac.tent.on || ac.train == segadapt::adapt::config::TrainScope::Norm {
            assert_eq!(moved, 0.0, "{name}: only norm affines train");
            assert!(a
                .student
                .vars
                .iter()
                .all(|(n, _)| segadapt::adapt::config::is_norm_affine(n)));
        } else {
            assert!(moved > 0.0, "{name}: the teacher must follow the student");
        }
        let state = a.state().unwrap();
        if ac.cpsl.on {
            let q = state["adapt.cpsl.queue"].dim(0).unwrap();
            assert!(
                q <= ac.cpsl.queue,
                "{name}: queue {q} over {}",
                ac.cpsl.queue
            );
            let prior: Vec<f32> = state["adapt.cpsl.prior"].to_vec1().unwrap();
            let s: f32 = prior.iter().sum();
            assert!((s - 1.0).abs() < 1e-3, "{name}: prior sums to {s}");
        }
        if ac.dida.on {
            let stored = fx.stats().bank.unwrap().labels.len();
            let k = state["adapt.dida.feats"].dim(0).unwrap();
            assert_eq!(k, ac.dida.bank.min(stored), "{name}");
            // Slots move towards source class means under source labels only: with no source
            // frames on board they stay the stored source instances.
            let bank = fx.stats().bank.unwrap().feats.narrow(0, 0, k).unwrap();
            let drift = common::max_diff(&state["adapt.dida.feats"], &bank);
            match ac.replay.on {
                true => assert!(drift > 0.0, "{name}: the replayed source moves the slots"),
                false => assert_eq!(drift, 0.0, "{name}: target pixels moved source slots"),
            }
        }
        if ac.cpsl.on {
            let moved = (&state["adapt.cpsl.protos"] - &fx.stats().prototypes)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(moved > 0.0, "{name}: CPSL's prototypes are trained");
        }
        if ac.hpla.on {
            let pooled = state["adapt.hpla.images"].dim(0).unwrap();
            assert_eq!(pooled, ac.hpla.pool.min(3), "{name}");
        }
        let terms: Vec<&str> = r.terms.iter().map(|(k, _)| *k).collect();
        let expected = [
            (ac.region.on, "entropy"),
            (ac.sepico.on, "sepico"),
            (ac.cpsl.on, "cpsl_consist"),
            (ac.bida.on, "bida_t2s"),
            (ac.bida.on, "bida_s2t"),
            (ac.dida.on, "dida"),
            (ac.replay.on, "source"),
        ];
        for (on, term) in expected.into_iter().filter(|_| !ac.tent.on) {
            assert_eq!(terms.contains(&term), on, "{name}: {terms:?}");
        }
        assert!(!ac.tent.on || terms == ["entropy"], "{name}: {terms:?}");
    }
}

/// Plain self-training on training budgets of `steps`, the collapse guard off.
fn budgeted(steps: u64) -> AdaptConfig {
    let mut ac = AdaptConfig::plain();
    ac.guard.collapse = false;
    ac.budget.on = true;
    ac.budget.steps = steps;
    ac
}

/// Serving for the runner tests: every frame predicted.
fn predict_each(
    pre: &PreprocessConfig,
) -> impl FnMut(u64, &segadapt::runtime::Arrived, &Segformer) -> segadapt::Result<()> + '_ {
    move |_, item, m| {
        segadapt::eval::predict_image(m, pre, &item.frame.image, &Device::Cpu)?;
        Ok(())
    }
}

/// Runs `adapter` over the fixture's frames at 30 fps, predicting each one.
fn serve_each(
    fx: &Fixture,
    adapter: Adapter,
    oc: &segadapt::runtime::online::OnlineConfig,
) -> segadapt::runtime::online::Ended {
    segadapt::runtime::online::run_online(
        fx.source(30.0),
        adapter,
        &fx.pre,
        oc,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        predict_each(&fx.pre),
        |_, _, _| Ok(()),
    )
    .unwrap()
}

/// A runner over a ring of 4 frames, batch 1, one step per frame, no checkpoints.
fn online_config(realtime: bool) -> segadapt::runtime::online::OnlineConfig {
    segadapt::runtime::online::OnlineConfig {
        pipeline: segadapt::runtime::PipelineConfig {
            realtime,
            queue: 2,
            metrics: None,
        },
        batch: 1,
        crop: None,
        ring: 4,
        steps_per_frame: None,
        every: 1,
        train_threads: 0,
        seed: 3,
        checkpoints: None,
        checkpoint_every: 0,
        start: None,
        step_budget: None,
        serve_dtype: candle_core::DType::F32,
    }
}

#[test]
fn online_runner_serves_every_frame_and_trains_beside_it() {
    use segadapt::runtime::online::{run_online, OnlineConfig};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let fx = fixture(5, true);
    let (cfg, tensors, pre) = (&fx.cfg, &fx.tensors, &fx.pre);
    for steps_per_frame in [Some(2), None] {
        let stats = fx.stats();
        let adapter = Adapter::new(full(), cfg, tensors, stats).unwrap();
        let source = fx.source(30.0);
        let oc = OnlineConfig {
            batch: 2,
            crop: Some((48, 32)),
            steps_per_frame,
            ..online_config(false)
        };
        let mut served = 0;
        let ended = run_online(
            source,
            adapter,
            pre,
            &oc,
            Arc::new(AtomicBool::new(false)),
            |before, item, m| {
                assert_eq!(before, served, "frames served before this one");
                served += 1;
                segadapt::eval::predict_image(m, pre, &item.frame.image, &Device::Cpu)
                    .map(|_| ())?;
                Ok(())
            },
            |_, _, _| Ok(()),
        )
        .unwrap();
        let (summary, adapter) = (ended.summary, ended.adapter);
        assert_eq!(
            (summary.frames_in, summary.frames_served, served),
            (5, 5, 5)
        );
        match steps_per_frame {
            // The ring holds a batch from the second frame on: 4 frames x 2 steps.
            Some(_) => assert_eq!(summary.train_steps, 8),
            None => assert_eq!(summary.train_steps, adapter.step),
        }
        if summary.train_steps > 0 {
            // Every switched-on component's terms are reported with their mean magnitude.
            let names: Vec<&str> = summary.loss_terms.iter().map(|(n, _)| n.as_str()).collect();
            for t in [
                "ce", "sepico", "cpsl", "bida_t2s", "bida_s2t", "dida", "smooth",
            ] {
                assert!(names.contains(&t), "{t} missing from {names:?}");
            }
            assert!(summary
                .loss_terms
                .iter()
                .all(|(_, v)| v.is_finite() && *v >= 0.0));
        }
    }
}

#[test]
fn a_restored_adapter_continues_exactly() {
    let fx = fixture(3, true);
    let (cfg, tensors) = (&fx.cfg, &fx.tensors);
    let x = Tensor::randn(0f32, 1.0, (2, 3, 48, 64), &Device::Cpu).unwrap();
    let strong = (&x * 0.9).unwrap();
    let mut a = Adapter::new(full(), cfg, tensors, fx.stats()).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(5);
    for _ in 0..2 {
        a.step(&x, &strong, &mut rng).unwrap();
    }
    // Through a checkpoint file, as a restarted `adapt` reads it.
    let dir = tempfile::tempdir().unwrap();
    let ck = segadapt::checkpoint::CheckpointDir::new(dir.path(), 2);
    ck.save(a.step, &a.state().unwrap(), Default::default())
        .unwrap();
    let loaded = ck.latest(&Device::Cpu).unwrap();
    let mut b = Adapter::restore(full(), cfg, tensors, fx.stats(), &loaded.tensors).unwrap();
    assert_eq!(b.step, 2);
    let mut rng_b = rng.clone();
    for _ in 0..2 {
        a.step(&x, &strong, &mut rng).unwrap();
        b.step(&x, &strong, &mut rng_b).unwrap();
    }
    let (sa, sb) = (a.state().unwrap(), b.state().unwrap());
    assert_eq!(sa.keys().collect::<Vec<_>>(), sb.keys().collect::<Vec<_>>());
    for (k, t) in &sa {
        let d = (t.to_dtype(candle_core::DType::F64).unwrap()
            - sb[k].to_dtype(candle_core::DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
        assert_eq!(d, 0.0, "{k} differs after restore");
    }
}

#[test]
fn source_replay_leaves_the_target_batchnorm_statistics_alone() {
    // The source crop trains the student but must not pull the running statistics the teacher
    // serves dusk frames with towards the source domain.
    // Without drop path the BatchNorm input does not depend on the random draws.
    let fx = fixture(3, false);
    let (cfg, tensors) = (&fx.cfg, &fx.tensors);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let running = |a: &Adapter| -> Vec<f32> {
        a.student.model.raw_tensors()["decode_head.batch_norm.running_mean"]
            .to_vec1()
            .unwrap()
    };
    let source: Vec<f32> = tensors["decode_head.batch_norm.running_mean"]
        .copy()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut means = Vec::new();
    for replay in [false, true] {
        let mut ac = AdaptConfig::plain();
        ac.replay.on = replay;
        // No source gradient and no pasting: only the source forward differs.
        ac.replay.weight = 0.0;
        ac.replay.mix = false;
        ac.guard.collapse = false;
        let mut a = Adapter::new(ac, cfg, tensors, fx.stats()).unwrap();
        let mut rng = segadapt::SeededRng::seed_from_u64(3);
        if replay {
            a.replay = Some(fx.replay(3, &mut rng));
        }
        let r = a.step(&x, &x, &mut rng).unwrap();
        assert_eq!(r.terms.iter().any(|(k, _)| *k == "source"), replay);
        means.push(running(&a));
    }
    assert_ne!(means[0], source, "the target step moves them");
    assert_eq!(means[0], means[1]);
}

#[test]
fn a_rollback_keeps_the_source_frames_on_board() {
    let fx = fixture(3, true);
    let mut ac = Method::Replay.config(&full());
    ac.guard.collapse = false;
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(2);
    a.replay = Some(fx.replay(2, &mut rng));
    let saved = a.state().unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    a.step(&x, &x, &mut rng).unwrap();
    a.rollback(&saved).unwrap();
    assert_eq!(a.step, 0);
    // The replay buffer is not checkpointed; the next step still has its source crop.
    let r = a.step(&x, &x, &mut rng).unwrap();
    assert!(r.terms.iter().any(|(k, _)| *k == "source"), "{r:?}");
}

#[test]
fn restore_after_a_resume_moves_towards_the_source_weights() {
    let fx = fixture(3, false);
    let mut ac = AdaptConfig::plain();
    ac.lr = 1e-3;
    ac.threshold = 0.0;
    ac.guard.collapse = false;
    ac.guard.restore = 0.01;
    let mut a = Adapter::new(ac.clone(), &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    for _ in 0..3 {
        a.step(&x, &x, &mut rng).unwrap();
    }
    let state = a.state().unwrap();
    let name = "decode_head.classifier.weight";
    let adapted = &state[&format!("student.{name}")];
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(flat(adapted), flat(&fx.tensors[name]), "the student moved");
    // Resumed with every element restored each step: it must land on the source model's
    // weights, not on the weights it resumed from.
    ac.guard.restore = 1.0;
    let mut b = Adapter::restore(ac, &fx.cfg, &fx.tensors, fx.stats(), &state).unwrap();
    b.step(&x, &x, &mut rng).unwrap();
    for (n, v) in &b.student.vars {
        let diff = (v.as_tensor() - &fx.tensors[n])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{n} is back at its source value");
    }
}

#[test]
fn the_teacher_tracks_the_batchnorm_statistics_of_the_frames_it_labels() {
    // The student sees the strong view (here brighter and with more contrast); the teacher
    // serves the frames themselves, so its statistics must come from those.
    let fx = fixture(3, false);
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let strong = ((&x * 3.0).unwrap() + 2.0).unwrap();
    let stats = |m: &Segformer| -> Vec<Vec<f32>> {
        ["running_mean", "running_var"]
            .map(|k| {
                m.raw_tensors()[&format!("decode_head.batch_norm.{k}")]
                    .to_vec1()
                    .unwrap()
            })
            .to_vec()
    };
    let copy = segadapt::model::ema::detached_copy(&fx.model).unwrap();
    let reference = Segformer::new(&fx.cfg, copy).unwrap();
    let source = stats(&reference);
    reference.forward_tracking(&x, Tracking::Batch).unwrap();
    let mut ac = AdaptConfig::plain();
    ac.guard.collapse = false;
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    a.step(&x, &strong, &mut rng).unwrap();
    assert_eq!(a.optimizer_steps(), 1);
    let (teacher, student) = (stats(&a.teacher), stats(&a.student.model));
    assert_eq!(teacher, stats(&reference), "one tracking step on the frame");
    assert_ne!(teacher, student, "the student's follow the strong view");
    assert_ne!(teacher, source, "they moved from the source's");
}

#[test]
fn tent_adapts_on_the_frame_not_the_strong_view() {
    let fx = fixture(3, false);
    let ac = Method::Tent.config(&full());
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    // A strong view full of NaN: TENT must not read it.
    let strong = (x.zeros_like().unwrap() / 0.0).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    let r = a.step(&x, &strong, &mut rng).unwrap();
    assert!(r.total.is_finite(), "{r:?}");
    assert_eq!(a.optimizer_steps(), 1);
}

#[test]
fn a_spent_training_budget_leaves_the_model_alone() {
    let fx = fixture(3, false);
    let mut ac = budgeted(2);
    ac.threshold = 0.0;
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    let idle: Vec<bool> = (0..4)
        .map(|_| a.step(&x, &x, &mut rng).unwrap().idle)
        .collect();
    assert_eq!(idle, vec![false, false, true, true]);
    assert_eq!(a.optimizer_steps(), 2);
    // The budget is part of the state: a restored adapter does not train either.
    let state = a.state().unwrap();
    let mut b = Adapter::restore(a.cfg.clone(), &fx.cfg, &fx.tensors, fx.stats(), &state).unwrap();
    assert!(b.step(&x, &x, &mut rng).unwrap().idle);
}

#[test]
fn with_the_budget_spent_the_teacher_still_follows_the_frames_statistics() {
    // A condition the shift test misses gets no budget of its own: its frames must still be
    // labelled and served with their own normalisation statistics, and nothing else may move.
    let fx = fixture(3, false);
    let ac = budgeted(1);
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let dark = ((&x * 0.2).unwrap() - 1.5).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    assert!(!a.step(&x, &x, &mut rng).unwrap().idle);
    let trained = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    // Its own copy: a model tracks in place, in the tensors it was built from.
    let copy = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    let reference = Segformer::new(&fx.cfg, copy).unwrap();
    reference.forward_tracking(&dark, Tracking::Batch).unwrap();
    assert!(a.step(&dark, &dark, &mut rng).unwrap().idle);
    let after = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    for k in ["running_mean", "running_var"] {
        let n = format!("decode_head.batch_norm.{k}");
        let v = |m: &segadapt::model::TensorMap| m[&n].to_vec1::<f32>().unwrap();
        assert_ne!(v(&after), v(&trained), "{n} followed the dark frame");
        // To rounding: so far from the source the teacher is led all of the way from the
        // source's statistics to the frame's, which is the frame's up to the last bit.
        let off = common::max_diff(&after[&n], &reference.raw_tensors()[&n]);
        assert!(off < 1e-6, "{n}: one tracking forward, {off} off");
    }
    assert_eq!(distance(&after, &trained), 0.0, "no weight moved");
    assert_eq!(a.optimizer_steps(), 1);
}

/// Euclidean distance between the trained tensors of two weight maps.
fn distance(a: &segadapt::model::TensorMap, b: &segadapt::model::TensorMap) -> f64 {
    a.iter()
        .filter(|(n, _)| n.ends_with("weight") || n.ends_with("bias"))
        .map(|(n, t)| {
            let d = (t - &b[n]).unwrap().sqr().unwrap().sum_all().unwrap();
            d.to_scalar::<f32>().unwrap() as f64
        })
        .sum::<f64>()
        .sqrt()
}

#[test]
fn with_condition_slots_a_new_condition_goes_on_from_the_nearest_kept_weights_a_known_one_from_its_own(
) {
    use segadapt::adapt::controller::Event;
    let fx = fixture(3, false);
    let mut ac = budgeted(500);
    (ac.threshold, ac.lr, ac.ema) = (0.0, 1e-3, 0.9);
    (ac.budget.window, ac.budget.slots) = (2, 4);
    let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let mut rng = segadapt::SeededRng::seed_from_u64(3);
    // Seeded frames whose level and contrast vary from frame to frame, so the condition's
    // statistics have a spread that sampling noise cannot cross the threshold of.
    let noise = |seed: u64, i: usize| -> Tensor {
        use rand_distr::Distribution;
        let mut r = segadapt::SeededRng::seed_from_u64(seed * 1000 + i as u64);
        let v: Vec<f32> = (0..3 * 48 * 64)
            .map(|_| rand_distr::StandardNormal.sample(&mut r))
            .collect();
        Tensor::from_vec(v, (1, 3, 48, 64), &Device::Cpu).unwrap()
    };
    let day = |i: usize| {
        let k = (i % 3) as f64;
        noise(1, i).affine(1.0 + 0.1 * k, 0.1 * k).unwrap()
    };
    let night = |i: usize| {
        let k = (i % 3) as f64;
        noise(2, i).affine(0.1 + 0.01 * k, -1.5 - 0.1 * k).unwrap()
    };
    let mut run = |a: &mut Adapter, x: Tensor| a.step(&x, &x, &mut rng).unwrap();
    for i in 0..12 {
        assert_eq!(run(&mut a, day(i)).event, Event::Steady);
    }
    let day_weights = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    let adapted = distance(&day_weights, &fx.tensors);
    assert!(adapted > 0.0);
    // Night: day's weights are kept, and training waits until night is told apart.
    let mut i = 0;
    while run(&mut a, night(i)).event == Event::Steady {
        i += 1;
        assert!(i < 6, "the shift to night is seen within the window");
    }
    let mut waited = 0;
    while run(&mut a, night(i + waited)).idle {
        waited += 1;
        assert!(waited < 12, "night is told apart");
    }
    assert!(waited > 0, "no step before night is told apart");
    // Then night goes on from day's weights, the nearest kept ones, not from the source.
    let at_night = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    assert!(
        distance(&at_night, &day_weights) < distance(&at_night, &fx.tensors) / 3.0,
        "night goes on from day's weights"
    );
    for i in 0..12 {
        run(&mut a, night(i));
    }
    // Back in day: day's weights come back once the window holds day frames alone.
    let events: Vec<Event> = (0..20)
        .map(|i| run(&mut a, day(i)).event)
        .take_while(|e| !matches!(e, Event::Recalled(_)))
        .collect();
    assert_eq!(events[0], Event::Shifted { left: Some(1) }, "{events:?}");
    assert!(events.len() < 20, "day is recognised: {events:?}");
    let back = segadapt::model::ema::detached_copy(&a.teacher).unwrap();
    assert!(
        distance(&back, &day_weights) < distance(&back, &fx.tensors) / 3.0,
        "the day weights are back"
    );
}

#[test]
fn in_real_time_a_slow_training_step_holds_no_frame_up() {
    use segadapt::runtime::online::{run_online, OnlineConfig};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let fx = fixture(20, false);
    let adapter = Adapter::new(full(), &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let source = fx.source(20.0);
    let oc = OnlineConfig {
        train_threads: 1,
        ..online_config(true)
    };
    let pre = &fx.pre;
    let summary = run_online(
        source,
        adapter,
        pre,
        &oc,
        Arc::new(AtomicBool::new(false)),
        predict_each(pre),
        // Each step keeps the trainer busy for half a second more.
        |_, _, _| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            Ok(())
        },
    )
    .unwrap()
    .summary;
    assert_eq!(summary.frames_in, 20);
    assert!(summary.train_steps >= 1, "{summary:?}");
    // A frame that waited for a step would have waited half a second.
    assert!(summary.latency_ms_max < 450.0, "{summary:?}");
    assert_eq!(summary.frames_served + summary.frames_dropped, 20);
}

#[test]
fn checkpoints_that_cannot_be_written_are_counted_and_serving_goes_on() {
    use segadapt::checkpoint::CheckpointDir;
    use segadapt::runtime::online::OnlineConfig;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    let fx = fixture(6, false);
    let adapter = Adapter::new(full(), &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    // A folder under a plain file: every write fails, as on a full or read-only disk.
    let blocker = fx.data.path().join("not-a-folder");
    std::fs::write(&blocker, b"x").unwrap();
    let metrics = Arc::new(segadapt::runtime::metrics::Metrics::default());
    let mut oc = OnlineConfig {
        steps_per_frame: Some(1),
        checkpoints: Some(Arc::new(CheckpointDir::new(blocker.join("checkpoints"), 2))),
        checkpoint_every: 1,
        ..online_config(false)
    };
    oc.pipeline.metrics = Some(metrics.clone());
    let ended = serve_each(&fx, adapter, &oc);
    assert_eq!(ended.summary.frames_served, 6);
    assert_eq!(ended.summary.train_steps, 6, "{:?}", ended.summary);
    assert_eq!(metrics.checkpoint_failures.load(Ordering::Relaxed), 6);
    assert!(metrics
        .render()
        .contains("segadapt_checkpoint_failures_total 6"));
}

#[test]
fn frames_without_content_are_served_but_never_trained_on() {
    use segadapt::runtime::online::OnlineConfig;
    let fx = fixture(6, false);
    // The camera fails to black for the last four frames.
    for i in 2..6 {
        image::RgbImage::new(64, 48)
            .save(fx.data.path().join(format!("images/f{i:03}.png")))
            .unwrap();
    }
    let adapter = Adapter::new(full(), &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let oc = OnlineConfig {
        steps_per_frame: Some(1),
        ..online_config(false)
    };
    let ended = serve_each(&fx, adapter, &oc);
    let s = &ended.summary;
    assert_eq!((s.frames_served, s.frames_blank), (6, 4), "{s:?}");
    // The black frames never reach the ring; steps go on over the two frames with content.
    assert_eq!(s.train_steps, 6);
}

#[test]
fn the_shift_test_watches_the_arriving_frames_not_the_ring_samples() {
    // Twelve day frames, then twelve night ones, through a ring of 16: samples drawn from the
    // ring stay mostly day for several frames after the change, the arriving frames do not.
    use segadapt::adapt::controller::Event;
    use segadapt::runtime::online::{run_online, OnlineConfig};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    let fx = fixture(24, false);
    for i in 0..24 {
        let path = fx.data.path().join(format!("images/f{i:03}.png"));
        let mut img = image::open(&path).unwrap().to_rgb8();
        let k = (i % 3) as u8;
        for p in img.pixels_mut() {
            for c in p.0.iter_mut() {
                *c = match i < 12 {
                    true => c.saturating_sub(30) + 12 * k,
                    false => *c / 8 + 2 * k,
                };
            }
        }
        img.save(&path).unwrap();
    }
    let mut ac = budgeted(500);
    (ac.budget.window, ac.budget.slots) = (2, 0);
    let adapter = Adapter::new(ac, &fx.cfg, &fx.tensors, fx.stats()).unwrap();
    let oc = OnlineConfig {
        steps_per_frame: Some(1),
        ring: 16,
        ..online_config(false)
    };
    let shifts = Mutex::new(Vec::new());
    run_online(
        fx.source(30.0),
        adapter,
        &fx.pre,
        &oc,
        Arc::new(AtomicBool::new(false)),
        predict_each(&fx.pre),
        |step, rep, _| {
            if matches!(rep.event, Event::Shifted { .. }) {
                shifts.lock().unwrap().push(step);
            }
            Ok(())
        },
    )
    .unwrap();
    // One step per frame from the first: step 13 follows the first night frame.
    let shifts = shifts.into_inner().unwrap();
    assert_eq!(
        shifts.iter().find(|&&s| s > 12),
        Some(&13),
        "shifts at steps {shifts:?}"
    );
}

#[test]
fn with_the_budget_spent_serving_gets_the_teachers_statistics_on_every_frame() {
    use segadapt::runtime::online::OnlineConfig;
    use std::sync::{Arc, Mutex};
    let fx = fixture(8, false);
    let ac = budgeted(2);
    let oc = OnlineConfig {
        steps_per_frame: Some(1),
        ..online_config(false)
    };
    let probe = Tensor::randn(0f32, 1.0, (1, 3, 48, 64), &Device::Cpu).unwrap();
    let logits = |m: &Segformer| m.forward(&probe, None).unwrap().logits;
    // Drives of 8 and of 7 frames: the 8th frame is served with what the 7th left.
    let served = Arc::new(Mutex::new(Vec::new()));
    let drive = |frames: usize| {
        let opts = segadapt::source::SourceOptions {
            fps: 30.0,
            limit: Some(frames),
            ..Default::default()
        };
        let spec = format!("folder:{}", fx.data.path().display());
        let adapter = Adapter::new(ac.clone(), &fx.cfg, &fx.tensors, fx.stats()).unwrap();
        let seen = served.clone();
        segadapt::runtime::online::run_online(
            segadapt::source::open(&spec, &opts).unwrap(),
            adapter,
            &fx.pre,
            &oc,
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
            move |_, _, m| {
                seen.lock().unwrap().push(logits(m));
                Ok(())
            },
            |_, _, _| Ok(()),
        )
        .unwrap()
    };
    let seven = drive(7);
    assert_eq!(seven.summary.train_steps, 2, "the budget was spent early");
    served.lock().unwrap().clear();
    drive(8);
    let served = served.lock().unwrap();
    let whole = Segformer::new(
        &fx.cfg,
        segadapt::model::ema::detached_copy(&seven.adapter.teacher).unwrap(),
    )
    .unwrap();
    assert_eq!(common::max_diff(&served[7], &logits(&whole)), 0.0);
    assert!(
        common::max_diff(&served[7], &served[4]) > 0.0,
        "the statistics moved between idle frames"
    );
}

#[test]
fn class_statistics_without_them_in_the_source_statistics_is_refused_with_the_fix() {
    let fx = fixture(2, true);
    let mut stats = fx.stats();
    assert!(stats.norm.is_some(), "segadapt stats writes them");
    stats.norm = None;
    let err = Adapter::new(full(), &fx.cfg, &fx.tensors, stats)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("adapt.statistics") && err.contains("segadapt stats"),
        "{err}"
    );
}

#[test]
fn source_statistics_keep_the_class_statistics_through_their_file() {
    let fx = fixture(2, true);
    let stats = fx.stats();
    let dir = tempfile::tempdir().unwrap();
    stats.save(dir.path()).unwrap();
    let back = SourceStats::load(dir.path(), &Device::Cpu).unwrap();
    let (a, b) = (stats.norm.unwrap(), back.norm.unwrap());
    for (x, y) in [(&a.mean, &b.mean), (&a.var, &b.var), (&a.count, &b.count)] {
        assert_eq!(common::max_diff(x, y), 0.0);
    }
}

#[test]
fn class_statistics_cut_short_or_misshaped_are_refused_naming_the_file() {
    let fx = fixture(2, true);
    let dir = tempfile::tempdir().unwrap();
    fx.stats().save(dir.path()).unwrap();
    let file = dir.path().join("source_stats.safetensors");
    let whole = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let rewrite = |edit: &dyn Fn(&mut std::collections::HashMap<String, Tensor>)| {
        let mut m = whole.clone();
        edit(&mut m);
        candle_core::safetensors::save(&m, &file).unwrap();
        SourceStats::load(dir.path(), &Device::Cpu)
            .err()
            .expect("refused")
            .to_string()
    };
    let err = rewrite(&|m| {
        m.remove("norm_class_var");
    });
    assert!(
        err.contains("source_stats.safetensors") && err.contains("missing norm_class_var"),
        "{err}"
    );
    let err = rewrite(&|m| {
        let v = m["norm_class_var"].narrow(1, 0, 1).unwrap();
        m.insert("norm_class_var".into(), v);
    });
    assert!(err.contains("norm_class_var [3, 1]"), "{err}");
    // Without any of them the file still loads, as one written before they existed.
    let mut m = whole.clone();
    for k in [
        "norm_class_mean",
        "norm_class_var",
        "norm_class_count",
        "norm_frame_spread",
    ] {
        m.remove(k);
    }
    candle_core::safetensors::save(&m, &file).unwrap();
    assert!(SourceStats::load(dir.path(), &Device::Cpu)
        .unwrap()
        .norm
        .is_none());
}

/// Two of the fixture's own (source) frames as one batch, the same frames darkened far from the
/// source, the source statistics, and the batch's distance from the source frames as the shift
/// test measures it (> 0).
fn source_like_frames(fx: &Fixture) -> (Tensor, Tensor, SourceStats, f64) {
    let frame = |i: usize| {
        segadapt::data::image_to_tensor(&fx.examples[i].image, &fx.pre, &Device::Cpu).unwrap()
    };
    let source_like = Tensor::cat(&[frame(0), frame(1)], 0).unwrap();
    let dark = ((&source_like * 0.2).unwrap() - 1.5).unwrap();
    let stats = fx.stats();
    let mut probe =
        segadapt::adapt::controller::Controller::new(&segadapt::adapt::config::Budget {
            threshold: 1e6,
            ..budgeted(50).budget
        })
        .with_source(stats.frames.clone().unwrap());
    probe.observe(&source_like).unwrap();
    let distance = probe.source_share() * 1e6;
    assert!(distance > 0.0);
    (source_like, dark, stats, distance)
}

#[test]
fn the_teacher_tracks_by_class_only_while_the_stream_looks_like_the_source() {
    let fx = fixture(4, false);
    let (source_like, dark, stats, distance) = source_like_frames(&fx);
    let mean = "decode_head.batch_norm.running_mean";
    // A shift threshold 5x the frames' distance from the source: they are near it (within a
    // quarter), and the statistics move at a fifth of their momentum.
    // The teacher's running mean after steps on `x`, tracking by class or as the batch has it.
    let tracked = |statistics, x: &Tensor| {
        let mut ac = budgeted(50);
        ac.budget.threshold = 5.0 * distance;
        ac.statistics = statistics;
        let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, stats.clone()).unwrap();
        let mut rng = segadapt::SeededRng::seed_from_u64(2);
        for _ in 0..3 {
            a.step(x, x, &mut rng).unwrap();
        }
        a.teacher.raw_tensors()[mean].copy().unwrap()
    };
    let (batch, class) = (Statistics::Batch, Statistics::Class);
    // Near the source the statistics move at a small share of their momentum: what tells the
    // two apart is where they go, against how far they go.
    let moved = common::max_diff(&tracked(batch, &source_like), &fx.tensors[mean]);
    let near = common::max_diff(&tracked(batch, &source_like), &tracked(class, &source_like));
    assert!(
        near > 0.1 * moved,
        "near the source, by class: {near} against {moved}"
    );
    let far = common::max_diff(&tracked(batch, &dark), &tracked(class, &dark));
    assert_eq!(far, 0.0, "far from it, as the batch has them");
}

#[test]
fn away_from_the_source_the_teachers_statistics_go_the_share_of_the_way() {
    let fx = fixture(4, false);
    let (source_like, dark, stats, distance) = source_like_frames(&fx);
    let mean = "decode_head.batch_norm.running_mean";
    // How far the teacher's running mean moves in five steps that leave the weights (lr 0):
    // with budgets at a threshold twice the frames' distance from the source (half the way,
    // and beyond the radius where it would track by class), and without.
    let moved = |budget: bool, x: &Tensor| {
        let mut ac = budgeted(50);
        ac.lr = 0.0;
        ac.budget.on = budget;
        ac.budget.threshold = 2.0 * distance;
        let mut a = Adapter::new(ac, &fx.cfg, &fx.tensors, stats.clone()).unwrap();
        let mut rng = segadapt::SeededRng::seed_from_u64(2);
        for _ in 0..5 {
            a.step(x, x, &mut rng).unwrap();
        }
        (a.teacher.raw_tensors()[mean].clone() - &fx.tensors[mean]).unwrap()
    };
    // The source's own frames lie within its frames' spread: the pixel share alone leads,
    // and the statistics head for half the way at the momentum's pace, as plain tracking heads
    // for all of it (at half the momentum they would have gone 55% as far).
    let (half, all) = (moved(true, &source_like), moved(false, &source_like));
    let size = common::max_diff(&all, &all.zeros_like().unwrap());
    assert!(size > 1e-4);
    let off = common::max_diff(&half, &(&all * 0.5).unwrap()) / size;
    assert!(off < 1e-3, "{off}");
    // Far from the source it is plain tracking.
    let (far, plain) = (moved(true, &dark), moved(false, &dark));
    assert!(common::max_diff(&far, &plain) < 1e-5);
}

/// The source weights with the classifier's bias for class `k` raised by `by`: a model that
/// labels more of every frame `k`, more confidently.
fn biased(tensors: &segadapt::model::TensorMap, k: usize, by: f32) -> segadapt::model::TensorMap {
    let mut t = tensors.clone();
    let name = "decode_head.classifier.bias";
    let mut b: Vec<f32> = t[name].to_vec1().unwrap();
    b[k] += by;
    t.insert(
        name.into(),
        Tensor::new(b.as_slice(), &Device::Cpu).unwrap(),
    );
    t
}

#[test]
fn a_new_condition_starts_from_the_candidate_the_signal_rates_highest() {
    use segadapt::adapt::choose::{weigh, Start};
    use segadapt::adapt::config::Judge;
    let fx = fixture(4, false);
    let frames: Vec<Tensor> = fx
        .examples
        .iter()
        .map(|e| segadapt::data::image_to_tensor(&e.image, &fx.pre, &Device::Cpu).unwrap())
        .collect();
    let in_place = Segformer::new(&fx.cfg, biased(&fx.tensors, 0, 0.5)).unwrap();
    let sure = biased(&fx.tensors, 1, 20.0);
    let (best, rated) = weigh(
        Judge::Confidence,
        &in_place,
        &fx.tensors,
        &[(3, &sure)],
        &frames,
        &[0.4, 0.3, 0.3],
    )
    .unwrap();
    assert_eq!(best, Start::Kept(3), "{rated:?}");
    let starts: Vec<Start> = rated.iter().map(|r| r.0).collect();
    assert_eq!(starts, [Start::InPlace, Start::Source, Start::Kept(3)]);
    assert_eq!(rated[1].1.source, 1.0, "the source agrees with itself");
    // Two candidates near the source outvote one that labels everything as class 1.
    let near = biased(&fx.tensors, 2, 0.1);
    let (best, rated) = weigh(
        Judge::Consensus,
        &Segformer::new(&fx.cfg, sure.clone()).unwrap(),
        &fx.tensors,
        &[(0, &near)],
        &frames,
        &[0.4, 0.3, 0.3],
    )
    .unwrap();
    assert_ne!(best, Start::InPlace, "{rated:?}");
    assert!(rated[0].1.consensus < rated[1].1.consensus, "{rated:?}");
}

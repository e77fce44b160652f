//! SegFormer (Mix Transformer encoder + all-MLP decode head) over HF-named tensors, trainable:
//! every parameter reaches the loss, BatchNorm trains, and the fused decoder embedding is exposed.

use super::class_norm::ClassNorm;
use super::nn::{drop_path, dropout, BatchNormRelu, LayerNorm, Linear, PatchConv};
use super::ops;
use super::recompute::{recomputed, GradStash, Recompute};
use crate::config::SegformerConfig;
use crate::SeededRng;
use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

/// Named tensors in HF's naming (`segformer.encoder.block.0.0.attention.self.query.weight`, ...).
pub type TensorMap = BTreeMap<String, Tensor>;

/// The entries of `map` under `prefix`, with the prefix taken off (`student.` -> a model map).
pub fn with_prefix(map: &TensorMap, prefix: &str) -> TensorMap {
    map.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
        .collect()
}

/// `map`'s entries with `prefix` put in front, for storing several models in one file.
pub fn prefixed(map: TensorMap, prefix: &str) -> TensorMap {
    map.into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
}

/// How a tensor starts when training from scratch (the initialisation of the MiT reference code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    /// Normal with std sqrt(2 / fan_out), fan_out = k * k * out / groups.
    FanOut {
        groups: usize,
    },
    Zeros,
    Ones,
    /// BatchNorm's batch counter (i64, not trainable).
    Counter,
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// False for BatchNorm running statistics.
    pub trainable: bool,
}

fn spec(out: &mut Vec<ParamSpec>, name: String, shape: &[usize], init: Init) {
    out.push(ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
        trainable: true,
    });
}

fn buffer(out: &mut Vec<ParamSpec>, name: String, shape: &[usize], init: Init) {
    out.push(ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
        trainable: false,
    });
}

fn linear_spec(out: &mut Vec<ParamSpec>, p: &str, o: usize, i: usize) {
    spec(out, format!("{p}.weight"), &[o, i], Init::Normal(0.02));
    spec(out, format!("{p}.bias"), &[o], Init::Zeros);
}

fn norm_spec(out: &mut Vec<ParamSpec>, p: &str, c: usize) {
    spec(out, format!("{p}.weight"), &[c], Init::Ones);
    spec(out, format!("{p}.bias"), &[c], Init::Zeros);
}

/// Every tensor of a SegFormer with this config, in HF's names and shapes.
pub fn param_specs(cfg: &SegformerConfig) -> Vec<ParamSpec> {
    let mut v = Vec::new();
    let d = cfg.decoder_hidden_size;
    for i in 0..cfg.num_encoder_blocks {
        let h = cfg.hidden_sizes[i];
        let cin = if i == 0 {
            cfg.num_channels
        } else {
            cfg.hidden_sizes[i - 1]
        };
        let k = cfg.patch_sizes[i];
        let p = format!("segformer.encoder.patch_embeddings.{i}");
        spec(
            &mut v,
            format!("{p}.proj.weight"),
            &[h, cin, k, k],
            Init::FanOut { groups: 1 },
        );
        spec(&mut v, format!("{p}.proj.bias"), &[h], Init::Zeros);
        norm_spec(&mut v, &format!("{p}.layer_norm"), h);
        for j in 0..cfg.depths[i] {
            let b = format!("segformer.encoder.block.{i}.{j}");
            norm_spec(&mut v, &format!("{b}.layer_norm_1"), h);
            for qkv in ["query", "key", "value"] {
                linear_spec(&mut v, &format!("{b}.attention.self.{qkv}"), h, h);
            }
            let sr = cfg.sr_ratios[i];
            if sr > 1 {
                let s = format!("{b}.attention.self.sr");
                spec(
                    &mut v,
                    format!("{s}.weight"),
                    &[h, h, sr, sr],
                    Init::FanOut { groups: 1 },
                );
                spec(&mut v, format!("{s}.bias"), &[h], Init::Zeros);
                norm_spec(&mut v, &format!("{b}.attention.self.layer_norm"), h);
            }
            linear_spec(&mut v, &format!("{b}.attention.output.dense"), h, h);
            norm_spec(&mut v, &format!("{b}.layer_norm_2"), h);
            let hm = h * cfg.mlp_ratios[i];
            linear_spec(&mut v, &format!("{b}.mlp.dense1"), hm, h);
            let dw = format!("{b}.mlp.dwconv.dwconv");
            spec(
                &mut v,
                format!("{dw}.weight"),
                &[hm, 1, 3, 3],
                Init::FanOut { groups: hm },
            );
            spec(&mut v, format!("{dw}.bias"), &[hm], Init::Zeros);
            linear_spec(&mut v, &format!("{b}.mlp.dense2"), h, hm);
        }
        norm_spec(&mut v, &format!("segformer.encoder.layer_norm.{i}"), h);
    }
    for i in 0..cfg.num_encoder_blocks {
        linear_spec(
            &mut v,
            &format!("decode_head.linear_c.{i}.proj"),
            d,
            cfg.hidden_sizes[i],
        );
    }
    let n = cfg.num_encoder_blocks;
    spec(
        &mut v,
        "decode_head.linear_fuse.weight".into(),
        &[d, n * d, 1, 1],
        Init::FanOut { groups: 1 },
    );
    norm_spec(&mut v, "decode_head.batch_norm", d);
    buffer(
        &mut v,
        "decode_head.batch_norm.running_mean".into(),
        &[d],
        Init::Zeros,
    );
    buffer(
        &mut v,
        "decode_head.batch_norm.running_var".into(),
        &[d],
        Init::Ones,
    );
    buffer(
        &mut v,
        "decode_head.batch_norm.num_batches_tracked".into(),
        &[],
        Init::Counter,
    );
    let c = cfg.num_labels();
    spec(
        &mut v,
        "decode_head.classifier.weight".into(),
        &[c, d, 1, 1],
        Init::Normal(0.01),
    );
    spec(
        &mut v,
        "decode_head.classifier.bias".into(),
        &[c],
        Init::Zeros,
    );
    v
}

/// Fresh weights for training from scratch, reproducible from `seed`.
pub fn init_tensors(cfg: &SegformerConfig, device: &Device, seed: u64) -> Result<TensorMap> {
    let mut rng = SeededRng::seed_from_u64(seed);
    let mut out = TensorMap::new();
    for s in param_specs(cfg) {
        let n: usize = s.shape.iter().product();
        let t = match s.init {
            Init::Counter => Tensor::new(0i64, device)?,
            Init::Zeros => Tensor::zeros(s.shape.clone(), DType::F32, device)?,
            Init::Ones => Tensor::ones(s.shape.clone(), DType::F32, device)?,
            Init::Normal(std) => normal(&mut rng, n, std, &s.shape, device)?,
            Init::FanOut { groups } => {
                let fan_out = s.shape[0] * s.shape[2] * s.shape[3] / groups;
                normal(&mut rng, n, (2.0 / fan_out as f64).sqrt(), &s.shape, device)?
            }
        };
        out.insert(s.name, t);
    }
    Ok(out)
}

fn normal(
    rng: &mut SeededRng,
    n: usize,
    std: f64,
    shape: &[usize],
    dev: &Device,
) -> Result<Tensor> {
    let dist = Normal::new(0f32, std as f32).map_err(candle_core::Error::wrap)?;
    let v: Vec<f32> = (0..n).map(|_| dist.sample(rng)).collect();
    Tensor::from_vec(v, shape, dev)
}

/// What one forward pass returns, channel-last at 1/4 of the input resolution.
pub struct SegOutput {
    /// [B, H/4, W/4, num_labels]
    pub logits: Tensor,
    /// The fused decoder embedding after BatchNorm and ReLU: [B, H/4, W/4, decoder_hidden_size].
    pub embed: Tensor,
}

struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    sr: Option<(PatchConv, LayerNorm)>,
    output: Linear,
    heads: usize,
}

struct MixFfn {
    dense1: Linear,
    dw_w: Tensor,
    dw_b: Tensor,
    dense2: Linear,
}

struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    ffn: MixFfn,
    drop_path: f64,
}

struct Stage {
    embed: PatchConv,
    embed_norm: LayerNorm,
    blocks: Vec<Arc<Block>>,
    norm: LayerNorm,
}

struct Decoder {
    fuse: Arc<StageFuse>,
    bn: BatchNormRelu,
    classifier: Linear,
}

/// The decode head up to its BatchNorm: each stage projected to the decoder width, upsampled to
/// 1/4 resolution and fused by the 1x1 conv.
struct StageFuse {
    linear_c: Vec<Linear>,
    weight: Tensor,
}

pub struct Segformer {
    pub cfg: SegformerConfig,
    tensors: TensorMap,
    specs: Vec<ParamSpec>,
    stages: Vec<Stage>,
    decoder: Decoder,
    recompute: Recompute,
    /// Gradients of recomputed blocks' parameters, between a backward pass and its end.
    stash: GradStash,
}

/// Looks tensors up by name, checking each shape against the spec.
struct Lookup<'a> {
    map: &'a TensorMap,
    shapes: BTreeMap<&'a str, &'a [usize]>,
}

impl Lookup<'_> {
    fn get(&self, name: &str) -> Result<Tensor> {
        let t = self
            .map
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?;
        if let Some(shape) = self.shapes.get(name) {
            if t.dims() != *shape {
                candle_core::bail!("tensor {name}: shape {:?}, expected {:?}", t.dims(), shape);
            }
        }
        Ok(t.clone())
    }

    fn linear(&self, p: &str) -> Result<Linear> {
        Ok(Linear {
            w: self.get(&format!("{p}.weight"))?,
            b: Some(self.get(&format!("{p}.bias"))?),
        })
    }

    fn norm(&self, p: &str, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: self.get(&format!("{p}.weight"))?,
            b: self.get(&format!("{p}.bias"))?,
            eps,
        })
    }
}

/// The decode head's BatchNorm statistics, which an inference forward may track
/// ([`Segformer::forward_tracking`]); the counter is a fresh tensor on every read.
pub const TRACKED_STATISTICS: [&str; 3] = [
    "decode_head.batch_norm.running_mean",
    "decode_head.batch_norm.running_var",
    "decode_head.batch_norm.num_batches_tracked",
];

/// HF's block norms are `nn.LayerNorm` defaults; `layer_norm_eps` is not what they use.
const LN_EPS: f64 = 1e-5;

impl Segformer {
    /// Builds the model over `tensors` (shared, not copied: a `Var`-backed map gives a trainable
    /// student, a plain map an inference-only teacher).
    pub fn new(cfg: &SegformerConfig, tensors: TensorMap) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let specs = param_specs(cfg);
        let lk = Lookup {
            map: &tensors,
            shapes: specs
                .iter()
                .map(|s| (s.name.as_str(), s.shape.as_slice()))
                .collect(),
        };
        let total_depth: usize = cfg.depths.iter().sum();
        let mut block_idx = 0;
        let mut stages = Vec::new();
        for i in 0..cfg.num_encoder_blocks {
            let p = format!("segformer.encoder.patch_embeddings.{i}");
            let embed = PatchConv {
                w: lk.get(&format!("{p}.proj.weight"))?,
                b: lk.get(&format!("{p}.proj.bias"))?,
                stride: cfg.strides[i],
                padding: cfg.patch_sizes[i] / 2,
            };
            let embed_norm = lk.norm(&format!("{p}.layer_norm"), LN_EPS)?;
            let mut blocks = Vec::new();
            for j in 0..cfg.depths[i] {
                let b = format!("segformer.encoder.block.{i}.{j}");
                let sr = cfg.sr_ratios[i];
                let sr = if sr > 1 {
                    Some((
                        PatchConv {
                            w: lk.get(&format!("{b}.attention.self.sr.weight"))?,
                            b: lk.get(&format!("{b}.attention.self.sr.bias"))?,
                            stride: sr,
                            padding: 0,
                        },
                        lk.norm(&format!("{b}.attention.self.layer_norm"), LN_EPS)?,
                    ))
                } else {
                    None
                };
                // Stochastic depth grows linearly over all blocks, as HF's `drop_path_rate`.
                let dp = if total_depth > 1 {
                    cfg.drop_path_rate * block_idx as f64 / (total_depth - 1) as f64
                } else {
                    0.0
                };
                block_idx += 1;
                blocks.push(Arc::new(Block {
                    norm1: lk.norm(&format!("{b}.layer_norm_1"), LN_EPS)?,
                    attn: Attention {
                        query: lk.linear(&format!("{b}.attention.self.query"))?,
                        key: lk.linear(&format!("{b}.attention.self.key"))?,
                        value: lk.linear(&format!("{b}.attention.self.value"))?,
                        sr,
                        output: lk.linear(&format!("{b}.attention.output.dense"))?,
                        heads: cfg.num_attention_heads[i],
                    },
                    norm2: lk.norm(&format!("{b}.layer_norm_2"), LN_EPS)?,
                    ffn: MixFfn {
                        dense1: lk.linear(&format!("{b}.mlp.dense1"))?,
                        dw_w: lk.get(&format!("{b}.mlp.dwconv.dwconv.weight"))?,
                        dw_b: lk.get(&format!("{b}.mlp.dwconv.dwconv.bias"))?,
                        dense2: lk.linear(&format!("{b}.mlp.dense2"))?,
                    },
                    drop_path: dp,
                }));
            }
            stages.push(Stage {
                embed,
                embed_norm,
                blocks,
                norm: lk.norm(&format!("segformer.encoder.layer_norm.{i}"), LN_EPS)?,
            });
        }
        let linear_c = (0..cfg.num_encoder_blocks)
            .map(|i| lk.linear(&format!("decode_head.linear_c.{i}.proj")))
            .collect::<Result<Vec<_>>>()?;
        let counter = lk.get("decode_head.batch_norm.num_batches_tracked")?;
        let decoder = Decoder {
            fuse: Arc::new(StageFuse {
                linear_c,
                weight: lk.get("decode_head.linear_fuse.weight")?,
            }),
            bn: BatchNormRelu {
                w: lk.get("decode_head.batch_norm.weight")?,
                b: lk.get("decode_head.batch_norm.bias")?,
                running_mean: lk.get("decode_head.batch_norm.running_mean")?,
                running_var: lk.get("decode_head.batch_norm.running_var")?,
                num_batches: AtomicI64::new(counter.to_dtype(DType::I64)?.to_scalar::<i64>()?),
                eps: 1e-5,
                momentum: 0.1,
            },
            classifier: Linear {
                w: lk.get("decode_head.classifier.weight")?,
                b: Some(lk.get("decode_head.classifier.bias")?),
            },
        };
        Ok(Self {
            cfg: cfg.clone(),
            tensors,
            specs,
            stages,
            decoder,
            recompute: Recompute::None,
            stash: GradStash::default(),
        })
    }

    /// The dtype of the model's weights and of its outputs.
    pub fn dtype(&self) -> DType {
        self.decoder.classifier.w.dtype()
    }

    /// A copy of the model with its floating-point tensors in `dtype` (the served model in
    /// half precision); the BatchNorm counter stays an integer.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors()?
            .into_iter()
            .map(|(k, t)| {
                let t = match t.dtype().is_float() {
                    true => t.detach().to_dtype(dtype)?,
                    false => t,
                };
                Ok((k, t))
            })
            .collect::<Result<TensorMap>>()?;
        Self::new(&self.cfg, tensors)
    }

    /// This model's weights (shared, not copied) with copies of `other`'s decode-head
    /// BatchNorm statistics and counter, in this model's dtype: the served model after a step
    /// that moved only the teacher's statistics, without copying every weight again.
    pub fn with_statistics_of(&self, other: &Segformer) -> Result<Self> {
        let mut tensors = self.tensors()?;
        let theirs = other.tensors()?;
        for n in TRACKED_STATISTICS {
            let t = match theirs[n].dtype().is_float() {
                true => theirs[n].detach().to_dtype(self.dtype())?.copy()?,
                false => theirs[n].clone(),
            };
            tensors.insert(n.to_string(), t);
        }
        Self::new(&self.cfg, tensors)
    }

    /// The device the model's tensors are on.
    pub fn device(&self) -> &Device {
        self.decoder.classifier.w.device()
    }

    /// What the backward pass of this model's training forwards recomputes.
    pub fn set_recompute(&mut self, r: Recompute) {
        self.recompute = r;
    }

    /// Backpropagates `loss` from this model's training forward: the gradients of every tensor
    /// it depends on, recomputed blocks' parameters included. Intermediate results are freed as
    /// the pass leaves them behind, so the graph cannot be backpropagated again.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = loss.backward_releasing()?;
        self.stash.merge_into(&mut grads)?;
        Ok(grads)
    }

    /// All tensors in HF names, the BatchNorm counter brought up to date.
    pub fn tensors(&self) -> Result<TensorMap> {
        let mut m = self.tensors.clone();
        m.insert(
            "decode_head.batch_norm.num_batches_tracked".into(),
            self.decoder.bn.num_batches_tensor()?,
        );
        Ok(m)
    }

    /// The tensor map as built (shared storage with the model).
    pub fn raw_tensors(&self) -> &TensorMap {
        &self.tensors
    }

    /// The tensors' specs ([`param_specs`] of the model's config).
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// `x`: [B, 3, H, W] normalised pixels. `train` carries the RNG for dropout and drop path and
    /// switches BatchNorm to batch statistics.
    pub fn forward(&self, x: &Tensor, train: Option<&mut SeededRng>) -> Result<SegOutput> {
        ops::on_pool(|| self.forward_on_pool(x, train, None)).map(|(out, _)| out)
    }

    /// An inference forward whose BatchNorm first moves its running statistics towards this
    /// batch's, then normalises with them: a teacher labelling target frames follows the
    /// statistics of the frames it serves, not those of the student's augmented views.
    pub fn forward_tracking(&self, x: &Tensor, track: Tracking<'_>) -> Result<SegOutput> {
        ops::on_pool(|| self.forward_on_pool(x, None, Some(track))).map(|(out, _)| out)
    }

    /// An inference forward that also returns the decode head's BatchNorm input
    /// ([B*H/4*W/4, D]), as the source statistics measure it.
    pub fn forward_fused(&self, x: &Tensor) -> Result<(SegOutput, Tensor)> {
        ops::on_pool(|| self.forward_on_pool(x, None, None))
    }

    fn forward_on_pool(
        &self,
        x: &Tensor,
        mut train: Option<&mut SeededRng>,
        track: Option<Tracking<'_>>,
    ) -> Result<(SegOutput, Tensor)> {
        let cfg = &self.cfg;
        let training = train.is_some();
        let rerun = (training && self.recompute == Recompute::Blocks).then(|| {
            self.stash.clear();
            Arc::new(cfg.clone())
        });
        let x = x.to_dtype(self.dtype())?;
        let mut h = x.permute((0, 2, 3, 1))?.contiguous()?; // [B, H, W, 3]
        let mut feats = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let (e, (hh, ww)) = {
                let _t = crate::profile::scope("model: patch embed");
                stage.embed.forward(&h)? // [B, N, C]
            };
            let mut s = stage.embed_norm.forward(&e)?;
            for block in &stage.blocks {
                s = match &rerun {
                    Some(cfg) => {
                        let (block, cfg) = (block.clone(), cfg.clone());
                        let f = move |x: &Tensor, rng: Option<&mut SeededRng>| {
                            block.forward(x, hh, ww, &cfg, rng)
                        };
                        recomputed(&s, train.as_deref_mut(), &self.stash, Arc::new(f))?
                    }
                    None => block.forward(&s, hh, ww, cfg, train.as_deref_mut())?,
                };
            }
            let s = stage.norm.forward(&s)?;
            let c = s.dim(2)?;
            h = s.reshape((s.dim(0)?, hh, ww, c))?; // [B, h_i, w_i, C_i]
            feats.push(h.clone());
        }
        let _t = crate::profile::scope("model: decode head");
        let d = &self.decoder;
        let (b, h1, w1, _) = feats[0].dims4()?;
        let dd = cfg.decoder_hidden_size;
        let y = match rerun.is_some() {
            true => d.fuse.recomputed(&feats, &self.stash)?,
            false => d.fuse.forward(&feats)?,
        }; // [B*h1*w1, D]
        let cls = Linear {
            w: d.classifier.w.reshape((cfg.num_labels(), dd))?,
            b: d.classifier.b.clone(),
        };
        match track {
            Some(Tracking::Batch) => d.bn.track(&y)?,
            Some(Tracking::ByClass(norm)) => {
                // The classes come from the statistics as they were before this batch.
                let labels = cls.forward(&d.bn.forward(&y, false)?)?.argmax(1)?;
                d.bn.track_by_class(&y, &labels, norm)?;
            }
            Some(Tracking::Anchored {
                share,
                source,
                norm,
            }) => d.bn.track_anchored(&y, share, source, norm)?,
            None => {}
        }
        let z = d.bn.forward(&y, training)?;
        let embed = z.reshape((b, h1, w1, dd))?;
        let z = dropout(&z, cfg.classifier_dropout_prob, train)?;
        let logits = cls.forward(&z)?.reshape((b, h1, w1, cfg.num_labels()))?;
        Ok((SegOutput { logits, embed }, y))
    }
}

/// How an inference forward moves the decode head's BatchNorm statistics
/// ([`Segformer::forward_tracking`]), always at BatchNorm's own momentum.
#[derive(Debug, Clone, Copy)]
pub enum Tracking<'a> {
    /// Towards the batch's statistics as they are.
    Batch,
    /// Towards the statistics the batch would have with the source's class shares
    /// ([`ClassNorm::batch_stats`]): the shift without the content.
    ByClass(&'a ClassNorm),
    /// Towards the batch's statistics moved only part of the way from `source` (the running
    /// mean and variance adaptation began from): `share` of it, or the batch's
    /// [`ClassNorm::feature_share`] where that is larger. As the share falls, the statistics
    /// go back to the source's at the momentum's pace.
    Anchored {
        share: f64,
        source: (&'a Tensor, &'a Tensor),
        norm: Option<&'a ClassNorm>,
    },
}

impl StageFuse {
    /// `feats`: the stages' outputs [B, h_i, w_i, C_i] -> [B*h1*w1, D] at the first stage's size.
    fn forward(&self, feats: &[Tensor]) -> Result<Tensor> {
        let (_, h1, w1, _) = feats[0].dims4()?;
        let dd = self.weight.dim(0)?;
        let fuse = self.weight.reshape((dd, ()))?;
        let n = self.linear_c.len();
        // HF concatenates the upsampled stage projections (stage 4 first) and applies the 1x1 fuse
        // conv at 1/4 resolution. Projection, upsampling and fuse are all linear, so each stage's
        // projection is folded into its slice of the fuse weight and applied before upsampling:
        // the same function without the [B*h1*w1, 4D] concat and its 4D x D GEMM.
        let mut folded = Vec::with_capacity(n);
        let mut bias: Option<Tensor> = None;
        for (i, lin) in self.linear_c.iter().enumerate() {
            let wj = fuse.narrow(1, (n - 1 - i) * dd, dd)?; // [D, D]
            folded.push(wj.matmul(&lin.w)?); // [D, C_i]
            if let Some(lb) = &lin.b {
                let fb = wj.matmul(&lb.unsqueeze(1)?)?.squeeze(1)?;
                bias = Some(match bias {
                    Some(acc) => (acc + fb)?,
                    None => fb,
                });
            }
        }
        // Bilinear weights sum to one, so the stages' biases pass through upsampling unchanged
        // and all join the first stage's projection, which needs no upsampling.
        let y = Linear {
            w: folded[0].clone(),
            b: bias,
        }
        .forward(&feats[0])?; // [B, h1, w1, D]
        let low = feats
            .iter()
            .zip(&folded)
            .skip(1)
            .map(|(f, w)| {
                Linear {
                    w: w.clone(),
                    b: None,
                }
                .forward(f) // [B, h_i, w_i, D]
            })
            .collect::<Result<Vec<_>>>()?;
        let y = ops::resize_add(&y, &low)?;
        debug_assert_eq!(y.dims()[1..3], [h1, w1]);
        y.reshape(((), dd)) // [B*h1*w1, D]
    }

    /// As `forward`, its full-resolution intermediates recomputed in the backward pass: the
    /// stages enter as one flat tensor (a recomputed function has one input), a few MB against
    /// the eight [B*h1*w1, D] tensors the plain forward keeps.
    fn recomputed(self: &Arc<Self>, feats: &[Tensor], stash: &GradStash) -> Result<Tensor> {
        let shapes: Vec<Vec<usize>> = feats.iter().map(|f| f.dims().to_vec()).collect();
        let flat = feats
            .iter()
            .map(|f| f.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        let fuse = self.clone();
        let f = move |x: &Tensor, _: Option<&mut SeededRng>| {
            let mut at = 0;
            let mut parts = Vec::with_capacity(shapes.len());
            for shape in &shapes {
                let n: usize = shape.iter().product();
                parts.push(x.narrow(0, at, n)?.reshape(shape.as_slice())?);
                at += n;
            }
            fuse.forward(&parts)
        };
        recomputed(&Tensor::cat(&flat, 0)?, None, stash, Arc::new(f))
    }
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        cfg: &SegformerConfig,
        mut train: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let a = self
            .attn
            .forward(&self.norm1.forward(x)?, h, w, cfg, train.as_deref_mut())?;
        let x = (drop_path(&a, self.drop_path, train.as_deref_mut())? + x)?;
        let m = self
            .ffn
            .forward(&self.norm2.forward(&x)?, h, w, cfg, train.as_deref_mut())?;
        drop_path(&m, self.drop_path, train)? + x
    }
}

impl Attention {
    /// `x`: [B, N, C] -> [B, N, C], keys and values from the spatially reduced sequence.
    fn forward(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        cfg: &SegformerConfig,
        mut train: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let _t = crate::profile::scope("model: attention");
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let m = t.dim(1)?;
            t.reshape((b, m, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous() // [B, heads, M, hd]
        };
        let q = split(self.query.forward(x)?)?;
        let kv_in = match &self.sr {
            Some((conv, norm)) => {
                let (r, _) = conv.forward(&x.reshape((b, h, w, c))?)?; // [B, N/sr^2, C]
                norm.forward(&r)?
            }
            None => x.clone(),
        };
        let k = split(self.key.forward(&kv_in)?)?;
        let v = split(self.value.forward(&kv_in)?)?;
        let scores = q.matmul(&k.t()?)?; // [B, heads, N, M]
        let probs = ops::softmax_last_dim(&scores, 1.0 / (hd as f64).sqrt())?;
        let probs = dropout(
            &probs,
            cfg.attention_probs_dropout_prob,
            train.as_deref_mut(),
        )?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?; // [B, N, C]
        let out = self.output.forward(&ctx)?;
        dropout(&out, cfg.hidden_dropout_prob, train)
    }
}

impl MixFfn {
    fn forward(
        &self,
        x: &Tensor,
        h: usize,
        w: usize,
        cfg: &SegformerConfig,
        mut train: Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let _t = crate::profile::scope("model: mix-ffn");
        let (b, n, _) = x.dims3()?;
        let y = self.dense1.forward(x)?; // [B, N, 4C]
        let hm = y.dim(2)?;
        let y = ops::depthwise3x3(&y.reshape((b, h, w, hm))?, &self.dw_w, &self.dw_b)?;
        let y = ops::gelu(&y.reshape((b, n, hm))?)?;
        let y = dropout(&y, cfg.hidden_dropout_prob, train.as_deref_mut())?;
        let y = self.dense2.forward(&y)?;
        dropout(&y, cfg.hidden_dropout_prob, train)
    }
}

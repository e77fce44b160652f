//! SegFormer model configuration in HuggingFace's `config.json` form (B0-B5 presets included);
//! unknown keys are kept so a folder round-trips through segadapt unchanged.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegformerConfig {
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_blocks")]
    pub num_encoder_blocks: usize,
    #[serde(default = "d_depths")]
    pub depths: Vec<usize>,
    #[serde(default = "d_sr")]
    pub sr_ratios: Vec<usize>,
    #[serde(default = "d_hidden")]
    pub hidden_sizes: Vec<usize>,
    #[serde(default = "d_patch")]
    pub patch_sizes: Vec<usize>,
    #[serde(default = "d_strides")]
    pub strides: Vec<usize>,
    #[serde(default = "d_heads")]
    pub num_attention_heads: Vec<usize>,
    #[serde(default = "d_mlp")]
    pub mlp_ratios: Vec<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_cls_drop")]
    pub classifier_dropout_prob: f64,
    #[serde(default = "d_init")]
    pub initializer_range: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path_rate: f64,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_decoder")]
    pub decoder_hidden_size: usize,
    #[serde(default = "d_ignore")]
    pub semantic_loss_ignore_index: i64,
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    #[serde(default)]
    pub label2id: BTreeMap<String, i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn d_channels() -> usize {
    3
}
fn d_blocks() -> usize {
    4
}
fn d_depths() -> Vec<usize> {
    vec![2, 2, 2, 2]
}
fn d_sr() -> Vec<usize> {
    vec![8, 4, 2, 1]
}
fn d_hidden() -> Vec<usize> {
    vec![32, 64, 160, 256]
}
fn d_patch() -> Vec<usize> {
    vec![7, 3, 3, 3]
}
fn d_strides() -> Vec<usize> {
    vec![4, 2, 2, 2]
}
fn d_heads() -> Vec<usize> {
    vec![1, 2, 5, 8]
}
fn d_mlp() -> Vec<usize> {
    vec![4, 4, 4, 4]
}
fn d_act() -> String {
    "gelu".into()
}
fn d_cls_drop() -> f64 {
    0.1
}
fn d_init() -> f64 {
    0.02
}
fn d_drop_path() -> f64 {
    0.1
}
fn d_ln_eps() -> f64 {
    1e-6
}
fn d_decoder() -> usize {
    256
}
fn d_ignore() -> i64 {
    255
}

impl SegformerConfig {
    /// The MiT-B0..B5 sizes of the SegFormer paper, with the given class names.
    pub fn preset(name: &str, classes: &[String], ignore_index: i64) -> Result<Self> {
        let (hidden, depths, decoder) = match name {
            "b0" => (vec![32, 64, 160, 256], vec![2, 2, 2, 2], 256),
            "b1" => (vec![64, 128, 320, 512], vec![2, 2, 2, 2], 256),
            "b2" => (vec![64, 128, 320, 512], vec![3, 4, 6, 3], 768),
            "b3" => (vec![64, 128, 320, 512], vec![3, 4, 18, 3], 768),
            "b4" => (vec![64, 128, 320, 512], vec![3, 8, 27, 3], 768),
            "b5" => (vec![64, 128, 320, 512], vec![3, 6, 40, 3], 768),
            other => {
                return Err(Error::config(
                    "config",
                    other,
                    "one of b0..b5 or a config.json path",
                ))
            }
        };
        let mut cfg: SegformerConfig = serde_json::from_value(serde_json::json!({}))
            .map_err(|e| Error::Invalid(format!("default config: {e}")))?;
        cfg.hidden_sizes = hidden;
        cfg.depths = depths;
        cfg.decoder_hidden_size = decoder;
        cfg.semantic_loss_ignore_index = ignore_index;
        cfg.set_classes(classes);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn set_classes(&mut self, classes: &[String]) {
        self.id2label = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c.clone()))
            .collect();
        self.label2id = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i as i64))
            .collect();
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: SegformerConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Invalid(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.entry("model_type").or_insert_with(|| "segformer".into());
            m.entry("architectures")
                .or_insert_with(|| serde_json::json!(["SegformerForSemanticSegmentation"]));
            m.insert("num_labels".into(), self.num_labels().into());
        }
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Invalid(e.to_string()))?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }

    /// The ignore label as a label-image value (255 when the index does not fit in a byte).
    pub fn ignore_label(&self) -> u8 {
        u8::try_from(self.semantic_loss_ignore_index).unwrap_or(255)
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// Class names in index order.
    pub fn class_names(&self) -> Vec<String> {
        (0..self.num_labels())
            .map(|i| {
                self.id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| format!("class_{i}"))
            })
            .collect()
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.num_encoder_blocks;
        let lists: [(&str, &Vec<usize>); 8] = [
            ("depths", &self.depths),
            ("sr_ratios", &self.sr_ratios),
            ("hidden_sizes", &self.hidden_sizes),
            ("patch_sizes", &self.patch_sizes),
            ("strides", &self.strides),
            ("num_attention_heads", &self.num_attention_heads),
            ("mlp_ratios", &self.mlp_ratios),
            ("hidden_sizes", &self.hidden_sizes),
        ];
        for (key, list) in lists {
            if list.len() != n {
                return Err(Error::config(
                    key,
                    format!("{list:?}"),
                    format!("needs num_encoder_blocks = {n} entries"),
                ));
            }
            if list.contains(&0) {
                return Err(Error::config(
                    key,
                    format!("{list:?}"),
                    "entries must be positive",
                ));
            }
        }
        for i in 0..n {
            if self.hidden_sizes[i] % self.num_attention_heads[i] != 0 {
                return Err(Error::config(
                    "num_attention_heads",
                    format!("{:?}", self.num_attention_heads),
                    format!("each must divide hidden_sizes {:?}", self.hidden_sizes),
                ));
            }
        }
        if self.hidden_act != "gelu" {
            return Err(Error::config(
                "hidden_act",
                &self.hidden_act,
                "only \"gelu\" is supported",
            ));
        }
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("classifier_dropout_prob", self.classifier_dropout_prob),
            ("drop_path_rate", self.drop_path_rate),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(key, p, "must be in [0, 1)"));
            }
        }
        if self.num_labels() == 0 {
            return Err(Error::config("id2label", "{}", "needs at least one class"));
        }
        for i in 0..self.num_labels() {
            if !self.id2label.contains_key(&i.to_string()) {
                return Err(Error::config(
                    "id2label",
                    format!("{:?}", self.id2label.keys().collect::<Vec<_>>()),
                    "keys must be 0..num_labels-1",
                ));
            }
        }
        Ok(())
    }
}

//! Named parameters. Every trainable tensor is a candle `Var` stored under its Hugging Face
//! checkpoint key, so saving and loading needs no rename table.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Result, Tensor, Var};
use stackwise_common::rng::Rng;

/// How a parameter is initialised when it is not loaded from a checkpoint.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f64),
    Ones,
    Zeros,
}

/// Collects the model's parameters while it is built: each one is taken from `loaded` when
/// present (HF weights, a checkpoint) or created from a seeded init.
pub struct ParamBuilder {
    loaded: HashMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
    seed: u64,
    device: Device,
    /// When true every parameter must come from `loaded`.
    require_loaded: bool,
}

impl ParamBuilder {
    pub fn init(seed: u64, device: &Device) -> Self {
        Self {
            loaded: HashMap::new(),
            vars: BTreeMap::new(),
            seed,
            device: device.clone(),
            require_loaded: false,
        }
    }

    pub fn from_tensors(loaded: HashMap<String, Tensor>, device: &Device) -> Self {
        Self {
            loaded,
            vars: BTreeMap::new(),
            seed: 0,
            device: device.clone(),
            require_loaded: true,
        }
    }

    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if let Some(v) = self.vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        let t = match self.loaded.remove(name) {
            Some(t) => {
                if t.dims() != shape {
                    candle_core::bail!(
                        "parameter {name}: checkpoint has shape {:?}, the config needs {shape:?}",
                        t.dims()
                    )
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
            None if self.require_loaded => {
                candle_core::bail!("parameter {name} ({shape:?}) is missing from the checkpoint")
            }
            None => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Ones => vec![1.0; n],
                    Init::Zeros => vec![0.0; n],
                    Init::Normal(std) => {
                        let mut rng = Rng::derive(self.seed, name);
                        (0..n).map(|_| (rng.normal() * std) as f32).collect()
                    }
                };
                Tensor::from_vec(data, shape, &self.device)?
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.vars.insert(name.to_string(), var);
        Ok(out)
    }

    /// The parameters, and the names of loaded tensors the model did not use.
    pub fn finish(self) -> (Params, Vec<String>) {
        let mut unused: Vec<String> = self.loaded.into_keys().collect();
        unused.sort();
        (Params { vars: self.vars }, unused)
    }
}

/// A model's parameters by checkpoint key, in a stable (sorted) order.
#[derive(Clone, Default)]
pub struct Params {
    pub vars: BTreeMap<String, Var>,
}

impl Params {
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// A snapshot of every tensor (detached copies are cheap: they share storage until `set`).
    /// The current values without copying (for serializing them right away, before the
    /// next optimizer step changes them).
    pub fn snapshot(&self) -> BTreeMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach())))
            .collect()
    }

    /// Overwrite values from `tensors`; every parameter must be present with its shape.
    pub fn load(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.vars {
            let Some(t) = tensors.get(name) else {
                candle_core::bail!("parameter {name} is missing")
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "parameter {name}: shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

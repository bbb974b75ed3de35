//! Exponential moving average of the weights: `ema = decay * ema + (1 - decay) * w` after
//! every optimizer step, evaluated and exported in place of the raw weights when enabled.

use std::collections::BTreeMap;

use candle_core::{Result, Tensor};

use crate::models::Params;

pub struct Ema {
    pub decay: f64,
    pub shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        Ok(Self {
            decay,
            shadow: params.tensors()?,
        })
    }

    pub fn update(&mut self, params: &Params) -> Result<()> {
        for (name, s) in self.shadow.iter_mut() {
            if let Some(var) = params.get(name) {
                *s = ((&*s * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn follows_the_weights_geometrically() {
        let var = Var::from_tensor(&Tensor::new(&[0f32], &Device::Cpu).unwrap()).unwrap();
        let params = Params {
            vars: BTreeMap::from([("w".to_string(), var.clone())]),
        };
        let mut ema = Ema::new(&params, 0.9).unwrap();
        var.set(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&params).unwrap();
        ema.update(&params).unwrap();
        let v = ema.shadow["w"].to_vec1::<f32>().unwrap()[0];
        assert!((v - (1.0 - 0.81)).abs() < 1e-6, "{v}");
    }
}

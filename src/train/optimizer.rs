//! AdamW whose state can be saved and restored, so a checkpointed run resumes exactly where it
//! stopped. tch's optimizer wraps libtorch's C++ one and exposes neither its moments nor its step
//! count, so the update is written here with the state in tensors of our own (tested against a
//! plain f64 reference and against tch's optimizer).
use std::collections::HashMap;

use tch::{nn::VarStore, Tensor};

pub struct AdamW {
    /// Trainable variables in the store's order (the order gradient norms are summed in).
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: i64,
    learning_rate: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// AdamW over every trainable variable of `vs`, with β₂ = 0.98 (SASRec's choice; short runs
    /// on sparse items adapt faster than with 0.999).
    pub fn new(vs: &VarStore, learning_rate: f64, weight_decay: f64) -> Self {
        let named = vs.variables();
        let params: Vec<(String, Tensor)> = vs
            .trainable_variables()
            .into_iter()
            .map(|tensor| {
                let name = named
                    .iter()
                    .find(|(_, t)| t.data_ptr() == tensor.data_ptr())
                    .map(|(name, _)| name.clone())
                    .expect("every trainable variable is named");
                (name, tensor)
            })
            .collect();
        let zeros = || params.iter().map(|(_, p)| p.zeros_like()).collect::<Vec<_>>();
        Self {
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            params,
            steps: 0,
            learning_rate,
            weight_decay,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
        }
    }

    pub fn zero_grad(&self) {
        for (_, param) in &self.params {
            let mut grad = param.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// Scales all gradients together so their joint L2 norm is at most `max`.
    pub fn clip_grad_norm(&self, max: f64) {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p)| p.grad())
                .filter(Tensor::defined)
                .map(|g| g.norm())
                .collect();
            if norms.is_empty() {
                return;
            }
            let total = f64::try_from(Tensor::stack(&norms, 0).norm()).expect("a scalar");
            let coefficient = max / (total + 1e-6);
            if coefficient < 1.0 {
                for (_, param) in &self.params {
                    let mut grad = param.grad();
                    if grad.defined() {
                        let _ = grad.g_mul_scalar_(coefficient);
                    }
                }
            }
        });
    }

    /// One update: decoupled weight decay, then the bias-corrected Adam step (Loshchilov &
    /// Hutter; the formula of `torch.optim.AdamW`).
    pub fn step(&mut self) {
        self.steps += 1;
        let correction1 = 1.0 - self.beta1.powi(self.steps as i32);
        let correction2 = 1.0 - self.beta2.powi(self.steps as i32);
        let step_size = self.learning_rate / correction1;
        let decay = 1.0 - self.learning_rate * self.weight_decay;
        tch::no_grad(|| {
            let moments = self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq);
            for ((_, param), (exp_avg, exp_avg_sq)) in self.params.iter_mut().zip(moments) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = param.g_mul_scalar_(decay);
                let _ = exp_avg.g_mul_scalar_(self.beta1).g_add_(&(&grad * (1.0 - self.beta1)));
                let _ = exp_avg_sq
                    .g_mul_scalar_(self.beta2)
                    .g_add_(&(&grad * &grad * (1.0 - self.beta2)));
                let denom = exp_avg_sq.sqrt() / correction2.sqrt() + self.eps;
                let _ = param.g_sub_(&(&*exp_avg / denom * step_size));
            }
        });
    }

    /// The learning rate of the next steps (a schedule sets it before each).
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.learning_rate = learning_rate;
    }

    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// The moments by variable name, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .zip(self.exp_avg.iter().zip(&self.exp_avg_sq))
            .flat_map(|((name, _), (avg, avg_sq))| {
                [
                    (format!("exp_avg.{name}"), avg.shallow_clone()),
                    (format!("exp_avg_sq.{name}"), avg_sq.shallow_clone()),
                ]
            })
            .collect()
    }

    /// Puts back what [`state`](Self::state) saved after `steps` updates; names the first moment
    /// missing or of the wrong shape.
    pub fn restore(&mut self, steps: i64, saved: &HashMap<String, Tensor>) -> Result<(), String> {
        let moments = self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq);
        for ((name, _), (avg, avg_sq)) in self.params.iter().zip(moments) {
            for (prefix, moment) in [("exp_avg", avg), ("exp_avg_sq", avg_sq)] {
                let key = format!("{prefix}.{name}");
                let value = saved.get(&key).ok_or_else(|| format!("no {key}"))?;
                if value.size() != moment.size() {
                    return Err(format!(
                        "{key} has shape {:?}, the model {:?}",
                        value.size(),
                        moment.size()
                    ));
                }
                tch::no_grad(|| moment.copy_(value));
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Kind};

    /// Plain AdamW in f64 for one parameter vector.
    struct Reference {
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, param: &mut [f64], grad: &[f64], lr: f64, wd: f64) {
            self.t += 1;
            let (b1, b2, eps) = (0.9, 0.98, 1e-8);
            for i in 0..param.len() {
                param[i] *= 1.0 - lr * wd;
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * grad[i];
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * grad[i] * grad[i];
                let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
                let denom = self.v[i].sqrt() / (1.0 - b2.powi(self.t)).sqrt() + eps;
                param[i] -= lr * m_hat / denom;
            }
        }
    }

    #[test]
    fn steps_follow_the_adamw_formula_for_random_settings() {
        for case in 0..8u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(case);
            let len = rng.gen_range(1..300);
            let lr = 10f64.powf(rng.gen_range(-4.0..-1.0));
            let wd = if case % 3 == 0 { 0.0 } else { rng.gen_range(0.0..0.1) };
            let start: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let vs = VarStore::new(Device::Cpu);
            let param = vs.root().var_copy("w", &Tensor::from_slice(&start));
            let mut adamw = AdamW::new(&vs, lr, wd);
            let mut reference = Reference {
                m: vec![0.0; len],
                v: vec![0.0; len],
                t: 0,
            };
            let mut expected: Vec<f64> = start.iter().map(|&x| f64::from(x)).collect();
            for _ in 0..rng.gen_range(1..30) {
                let scale = 10f32.powf(rng.gen_range(-3.0..1.0));
                let grad: Vec<f32> = (0..len).map(|_| rng.gen_range(-scale..scale)).collect();
                adamw.zero_grad();
                // d/dw of sum(w * g) is g: the gradient arrives through autograd, as in training.
                (&param * Tensor::from_slice(&grad)).sum(Kind::Float).backward();
                adamw.step();
                let grad: Vec<f64> = grad.iter().map(|&g| f64::from(g)).collect();
                reference.step(&mut expected, &grad, lr, wd);
            }
            let got = Vec::<f32>::try_from(&param).unwrap();
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (f64::from(*g) - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "case {case}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn a_small_model_trains_along_the_same_path_as_with_libtorchs_adamw() {
        // Everything from a local generator: libtorch's global one is shared by parallel tests.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let (start, inputs) = (draw(8 * 4), draw(32 * 8));
        let targets: Vec<i64> = (0..32).map(|i| i % 4).collect();
        let inputs = Tensor::from_slice(&inputs).view([32, 8]);
        let targets = Tensor::from_slice(&targets);
        let run = |ours: bool| {
            let vs = VarStore::new(Device::Cpu);
            let weights = vs.root().var_copy("w", &Tensor::from_slice(&start).view([8, 4]));
            let mut theirs = nn::AdamW {
                beta2: 0.98,
                wd: 0.01,
                ..Default::default()
            }
            .build(&vs, 0.01)
            .unwrap();
            let mut mine = AdamW::new(&vs, 0.01, 0.01);
            for _ in 0..50 {
                let loss = inputs.matmul(&weights).cross_entropy_for_logits(&targets);
                if ours {
                    mine.zero_grad();
                    loss.backward();
                    mine.clip_grad_norm(1.0);
                    mine.step();
                } else {
                    theirs.zero_grad();
                    loss.backward();
                    theirs.clip_grad_norm(1.0);
                    theirs.step();
                }
            }
            Vec::<f32>::try_from(weights.view(-1)).unwrap()
        };
        let (ours, theirs) = (run(true), run(false));
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        assert!(ours.iter().zip(&start).any(|(a, b)| (a - b).abs() > 0.1), "it trained");
    }

    #[test]
    fn restore_puts_back_the_moments_and_refuses_a_wrong_shape() {
        let vs = VarStore::new(Device::Cpu);
        let param = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.0]));
        let mut adamw = AdamW::new(&vs, 0.01, 0.0);
        for _ in 0..3 {
            adamw.zero_grad();
            (&param * &param).sum(Kind::Float).backward();
            adamw.step();
        }
        let saved: HashMap<String, Tensor> = adamw.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let mut fresh = AdamW::new(&vs, 0.01, 0.0);
        fresh.restore(adamw.steps(), &saved).unwrap();
        assert_eq!(fresh.steps(), 3);
        for ((name, a), (_, b)) in fresh.state().iter().zip(adamw.state()) {
            assert!(a.equal(&b), "{name}");
        }
        let mut wrong: HashMap<String, Tensor> = saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        wrong.insert("exp_avg.w".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)));
        assert_eq!(
            fresh.restore(3, &wrong).unwrap_err(),
            "exp_avg.w has shape [2], the model [3]"
        );
        wrong.remove("exp_avg.w");
        assert_eq!(fresh.restore(3, &wrong).unwrap_err(), "no exp_avg.w");
    }
}

//! Checkpoint and resume. Alone in its own test binary: libtorch's random generator (dropout)
//! is one per process, so a training running beside it in another test thread would draw from
//! it too and the two runs compared here would differ for that reason alone.
mod common;

use xsrec::data::split::build_sequences;
use xsrec::data::synth::{synthesize, SynthConfig};
use xsrec::data::vocab::Vocab;
use xsrec::model::{ModelConfig, SeqModel};
use xsrec::train::{train, Batching, CheckpointPlan, EpochLog, Loss, TrainConfig};

/// Every variable's values, by name.
fn weights(model: &SeqModel) -> Vec<(String, Vec<f32>)> {
    let mut named: Vec<(String, Vec<f32>)> = model
        .vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, Vec::<f32>::try_from(t.view(-1)).unwrap()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[test]
fn a_resumed_run_ends_exactly_where_the_uninterrupted_one_does() {
    let events = synthesize(&SynthConfig::new(120, 50, 4));
    let set = build_sequences(&events, Vocab::new(), Vocab::new(), true);
    let config = ModelConfig {
        // Dropout draws from libtorch's generator: the resumed run must draw the same masks.
        dropout: 0.3,
        ..common::small_model(&set, 16, 16)
    };
    // The sampled loss also draws negatives from the run's own generator; a decaying learning
    // rate must pick up at the step it had reached; shuffled batches draw their own plan.
    for (loss, lr_decay_epochs, batching) in [
        (Loss::Full, None, Batching::Grouped),
        (Loss::Sampled, None, Batching::Grouped),
        (Loss::Full, Some(5), Batching::Shuffled),
    ] {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let cfg = |max_epochs: usize, dir: &std::path::Path, resume: bool| TrainConfig {
            batch_size: 16,
            batching,
            lr_decay_epochs,
            weight_decay: 0.01,
            patience: 100,
            loss,
            negatives: 20,
            session_start_weight: 2.0,
            checkpoint: Some(CheckpointPlan {
                dir: dir.to_path_buf(),
                resume,
            }),
            ..common::quick_training(9, max_epochs)
        };
        // A decaying run ends where its learning rate reaches zero, whatever the epoch cap.
        let whole_cap = if lr_decay_epochs.is_some() { 50 } else { 5 };
        let whole = train(&set, config.clone(), &cfg(whole_cap, dirs[0].path(), false)).unwrap();
        assert_eq!(whole.epochs.len(), 5);
        // A run stopped after its second epoch leaves that epoch's checkpoint, as a kill would.
        let stopped = train(&set, config.clone(), &cfg(2, dirs[1].path(), false)).unwrap();
        assert_eq!(stopped.epochs.len(), 2);
        let resumed = train(&set, config.clone(), &cfg(5, dirs[1].path(), true)).unwrap();
        assert_eq!(weights(&resumed.model), weights(&whole.model), "{loss:?}");
        assert_eq!(resumed.best_epoch, whole.best_epoch);
        let curve = |epochs: &[EpochLog]| -> Vec<(usize, f64, f64)> {
            epochs
                .iter()
                .map(|e| (e.epoch, e.train_loss, e.validation_ndcg10))
                .collect()
        };
        assert_eq!(curve(&resumed.epochs), curve(&whole.epochs), "{loss:?}");
        let mut files: Vec<String> = std::fs::read_dir(dirs[1].path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["epoch-0005.json", "epoch-0005.safetensors"]);
        // Resuming a finished run trains no further and returns the same model.
        let again = train(&set, config.clone(), &cfg(5, dirs[1].path(), true)).unwrap();
        assert_eq!(weights(&again.model), weights(&whole.model));
        // Another learning rate is another run: refused, naming the setting.
        let other = TrainConfig {
            learning_rate: 1e-3,
            ..cfg(6, dirs[1].path(), true)
        };
        let err = match train(&set, config.clone(), &other) {
            Ok(_) => panic!("a checkpoint of another run was resumed"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("training.learning_rate: 0.003 then, 0.001 now"), "{err}");
    }
}

//! Short real trainings on synthetic logs: the model must beat popularity, and the
//! cross-session features must pay off where they should — on events that open a new session.
use tch::Device;
use xsrec::data::split::{build_sequences, SequenceSet, Target};
use xsrec::data::synth::{synthesize, SynthConfig};
use xsrec::data::vocab::Vocab;
use xsrec::eval::{evaluate, CaseResult, CaseScorer, EvalOptions, Metrics};
use xsrec::model::{Arch, Combine, Features, ModelConfig, Popularity, SeqModel};
use xsrec::train::{train, CheckpointPlan, EpochLog, Loss, TrainConfig};

const MAX_LEN: usize = 50;
const GAP: i64 = 1800;

fn synthetic() -> SequenceSet {
    let events = synthesize(&SynthConfig::new(1000, 240, 11));
    build_sequences(&events, Vocab::new(), Vocab::new(), true)
}

fn fit(set: &SequenceSet, arch: Arch, features: Features) -> SeqModel {
    let config = ModelConfig {
        arch,
        num_items: set.items.len(),
        num_event_types: set.event_types.len(),
        max_len: MAX_LEN,
        d_model: 32,
        n_heads: 2,
        n_layers: 1,
        ffn_dim: 64,
        dropout: 0.1,
        tied_output: true,
        features,
        session_gap_secs: GAP,
    };
    let cfg = TrainConfig {
        seed: 5,
        max_epochs: 30,
        batch_size: 64,
        learning_rate: 3e-3,
        weight_decay: 0.0,
        grad_clip: 1.0,
        patience: 30,
        loss: Loss::Full,
        negatives: 0,
        mask_seen: false,
        session_start_weight: 1.0,
        device: Device::Cpu,
        progress: false,
        checkpoint: None,
    };
    train(set, config, &cfg).expect("trains").model
}

/// Validation and test cases together: twice the evidence for the session-start subset.
fn cases(scorer: &dyn CaseScorer, set: &SequenceSet) -> Vec<CaseResult> {
    [Target::Validation, Target::Test]
        .into_iter()
        .flat_map(|target| {
            let opts = EvalOptions {
                target,
                exclude_seen: false,
                batch_size: 256,
                max_len: MAX_LEN,
                session_gap_secs: GAP,
                device: Device::Cpu,
                window: xsrec::model::WindowPolicy::Newest,
            };
            evaluate(scorer, set, &opts)
        })
        .collect()
}

fn metric(results: &[CaseResult], new_session: Option<bool>, name: &str) -> f64 {
    let ranks = results
        .iter()
        .filter(|r| new_session.is_none_or(|n| r.new_session == n))
        .map(|r| (r.rank, r.candidates));
    Metrics::from_ranks(ranks).get(name)
}

#[test]
fn cross_session_features_help_on_session_start_events() {
    let set = synthetic();
    let popularity = cases(&Popularity::new(&set.train_item_counts(), Device::Cpu), &set);
    let full = cases(&fit(&set, Arch::Transformer, Features::default()), &set);
    let plain_features = Features {
        session_recency: false,
        time_gap: false,
        event_type: false,
        prediction_gap: false,
        combine: Combine::Sum,
        ..Features::default()
    };
    let plain = cases(&fit(&set, Arch::Transformer, plain_features), &set);
    let report = |name: &str, r: &[CaseResult]| {
        eprintln!(
            "{name}: NDCG@10 all {:.4} new-session {:.4} same-session {:.4}; HR@10 new-session {:.4}",
            metric(r, None, "NDCG@10"),
            metric(r, Some(true), "NDCG@10"),
            metric(r, Some(false), "NDCG@10"),
            metric(r, Some(true), "HR@10")
        )
    };
    report("popularity", &popularity);
    report("plain", &plain);
    report("cross-session", &full);
    assert!(metric(&full, None, "NDCG@10") > metric(&popularity, None, "NDCG@10") + 0.05);
    assert!(metric(&plain, None, "NDCG@10") > metric(&popularity, None, "NDCG@10") + 0.05);
    // The planted rule is only usable by a model that knows a new session starts and what the
    // previous one was about: here the plain model falls below popularity, the full one does not.
    assert!(metric(&full, Some(true), "NDCG@10") > metric(&plain, Some(true), "NDCG@10") + 0.15);
    assert!(metric(&full, Some(true), "NDCG@10") > metric(&popularity, Some(true), "NDCG@10") + 0.1);
    assert!(metric(&full, Some(true), "HR@10") > metric(&plain, Some(true), "HR@10") + 0.1);
}

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
        arch: Arch::Transformer,
        num_items: set.items.len(),
        num_event_types: set.event_types.len(),
        max_len: 16,
        d_model: 16,
        n_heads: 2,
        n_layers: 1,
        ffn_dim: 32,
        // Dropout draws from libtorch's generator: the resumed run must draw the same masks.
        dropout: 0.3,
        tied_output: true,
        features: Features::default(),
        session_gap_secs: GAP,
    };
    // The sampled loss also draws negatives from the run's own generator.
    for loss in [Loss::Full, Loss::Sampled] {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let cfg = |max_epochs: usize, dir: &std::path::Path, resume: bool| TrainConfig {
            seed: 9,
            max_epochs,
            batch_size: 16,
            learning_rate: 3e-3,
            weight_decay: 0.01,
            grad_clip: 1.0,
            patience: 100,
            loss,
            negatives: 20,
            mask_seen: true,
            session_start_weight: 2.0,
            device: Device::Cpu,
            progress: false,
            checkpoint: Some(CheckpointPlan {
                dir: dir.to_path_buf(),
                resume,
            }),
        };
        let whole = train(&set, config.clone(), &cfg(5, dirs[0].path(), false)).unwrap();
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

//! Short real trainings on synthetic logs: the model must beat popularity, and the
//! cross-session features must pay off where they should — on events that open a new session.
mod common;

use tch::Device;
use xsrec::data::split::{build_sequences, SequenceSet, Target};
use xsrec::data::synth::{synthesize, SynthConfig};
use xsrec::data::vocab::Vocab;
use xsrec::eval::{evaluate, CaseResult, CaseScorer, EvalOptions, Metrics};
use xsrec::model::{Arch, Combine, Features, ModelConfig, Popularity, SeqModel};
use xsrec::train::{train, TrainConfig};

const MAX_LEN: usize = 50;
const GAP: i64 = 1800;

fn synthetic() -> SequenceSet {
    let events = synthesize(&SynthConfig::new(1000, 240, 11));
    build_sequences(&events, Vocab::new(), Vocab::new(), true)
}

fn fit(set: &SequenceSet, arch: Arch, features: Features) -> SeqModel {
    let config = ModelConfig {
        arch,
        features,
        ..common::small_model(set, MAX_LEN, 32)
    };
    let cfg = TrainConfig {
        mask_seen: false,
        ..common::quick_training(5, 30)
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

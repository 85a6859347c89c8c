//! Short trainings on logs of the synthetic cross-session family (`xsrec data synth --pattern`),
//! scored on each user's held-out test event only, at the events that open a new session: the
//! model must beat its flattened-time control and the last-item-plus-gap transitions, and the
//! feature the rule needs must matter (its ablation loses), each by a paired bootstrap interval
//! that excludes zero.
mod common;

use tch::Device;
use xsrec::data::family::{flatten_time, generate, FamilyParams, Pattern};
use xsrec::data::split::{build_sequences, SequenceSet, Target};
use xsrec::data::vocab::Vocab;
use xsrec::eval::bootstrap::paired_bootstrap;
use xsrec::eval::references::{label_sessions_from, OracleScorer, TransitionBaseline};
use xsrec::eval::{evaluate, ndcg10, CaseResult, CaseScorer, EvalOptions};
use xsrec::model::{Features, ModelConfig, SeqModel};
use xsrec::train::train;

const MAX_LEN: usize = 50;

struct Family {
    real: SequenceSet,
    control: SequenceSet,
    gap: i64,
}

fn family(pattern: Pattern, seed: u64, users: usize) -> (Family, xsrec::data::family::FamilyLog) {
    let params = FamilyParams {
        users,
        ..FamilyParams::draw(pattern, seed)
    };
    let log = generate(&params);
    let real = build_sequences(&log.events, Vocab::new(), Vocab::new(), true);
    let control = build_sequences(
        &flatten_time(&log.events),
        real.items.clone(),
        real.event_types.clone(),
        false,
    );
    let gap = params.session_gap_secs;
    (Family { real, control, gap }, log)
}

fn fit(set: &SequenceSet, features: Features, gap: i64, epochs: usize) -> SeqModel {
    let config = ModelConfig {
        n_layers: 2,
        features,
        session_gap_secs: gap,
        ..common::small_model(set, MAX_LEN, 32)
    };
    let cfg = common::quick_training(3, epochs);
    train(set, config, &cfg).expect("trains").model
}

/// Test-event results labelled by the real log's sessions.
fn scored(scorer: &dyn CaseScorer, set: &SequenceSet, family: &Family) -> Vec<CaseResult> {
    let opts = EvalOptions {
        target: Target::Test,
        exclude_seen: true,
        batch_size: 256,
        max_len: MAX_LEN,
        session_gap_secs: family.gap,
        device: Device::Cpu,
        window: xsrec::model::WindowPolicy::Newest,
    };
    let mut results = evaluate(scorer, set, &opts);
    label_sessions_from(&mut results, &family.real, family.gap);
    results
}

fn session_starts(results: &[CaseResult]) -> Vec<f64> {
    results
        .iter()
        .zip(ndcg10(results))
        .filter(|(r, _)| r.new_session)
        .map(|(_, v)| v)
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// Asserts that `model` beats `other` at session starts by an interval that excludes zero.
fn beats(model: &[f64], other: &[f64], what: &str) {
    let interval = paired_bootstrap(model, other, 2000, 0.95, 11);
    eprintln!(
        "session-start NDCG@10 {:.4} vs {what} {:.4}: {:+.4} ({:+.4} .. {:+.4})",
        mean(model),
        mean(other),
        interval.mean_difference,
        interval.lower,
        interval.upper
    );
    assert!(interval.lower > 0.0, "no better than {what}: {interval:?}");
}

const PERIODIC_EPOCHS: usize = 80;

/// Periodic interest: which topic a session opens with depends on the clock at the moment of
/// prediction and on the user's own topics by time of day, which the clock readout reads and
/// flattened time hides.
#[test]
fn the_periodic_rule_is_learned_through_the_clock_readout_and_real_time() {
    let (family, log) = family(Pattern::Periodic, 0, 800);
    let full = session_starts(&scored(
        &fit(&family.real, Features::default(), family.gap, PERIODIC_EPOCHS),
        &family.real,
        &family,
    ));
    let no_clock = Features {
        clock_readout: false,
        ..Features::default()
    };
    let without_clock = session_starts(&scored(
        &fit(&family.real, no_clock, family.gap, PERIODIC_EPOCHS),
        &family.real,
        &family,
    ));
    let control = session_starts(&scored(
        &fit(&family.control, Features::default(), family.gap, PERIODIC_EPOCHS),
        &family.control,
        &family,
    ));
    let transitions = session_starts(&scored(
        &TransitionBaseline::fit(&family.real, family.gap),
        &family.real,
        &family,
    ));
    let oracle = session_starts(&scored(&OracleScorer::new(&log), &family.real, &family));
    eprintln!(
        "oracle session-start NDCG@10 {:.4} over {} cases",
        mean(&oracle),
        oracle.len()
    );
    beats(&full, &control, "the flattened-time control");
    beats(&full, &transitions, "last item + gap");
    beats(&full, &without_clock, "the model without its clock readout");
}

/// Topic rotation: a user cycles through their own order of 3–5 topics, one per session, so a
/// new session's topic is whichever followed the current one last time, which only the user's
/// own earlier sessions show. The encoder alone did not learn it (docs/QUALITY.md); the
/// session-successor readout must make the difference.
#[test]
fn the_rotation_rule_is_learned_through_the_session_successor() {
    let (family, log) = family(Pattern::Rotation, 1, 600);
    let epochs = 40;
    let full = session_starts(&scored(
        &fit(&family.real, Features::default(), family.gap, epochs),
        &family.real,
        &family,
    ));
    let no_successor = Features {
        session_successor: false,
        ..Features::default()
    };
    let without_successor = session_starts(&scored(
        &fit(&family.real, no_successor, family.gap, epochs),
        &family.real,
        &family,
    ));
    let oracle = session_starts(&scored(&OracleScorer::new(&log), &family.real, &family));
    eprintln!(
        "oracle session-start NDCG@10 {:.4} over {} cases",
        mean(&oracle),
        oracle.len()
    );
    beats(&full, &without_successor, "the model without its session successor");
}

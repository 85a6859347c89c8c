//! The repeat term against an oracle: logs whose users go back to an item they had with a known
//! probability (drawn per case, zero included), and models trained on them with the repeat term.
//! The probability mass a model puts on the items the user had must match that rate over the
//! events it was trained on, and where nobody repeats, ranking the seen items too must cost
//! (almost) nothing.
mod common;

use std::collections::{BTreeMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind};
use xsrec::data::split::{build_sequences, SequenceSet, Target};
use xsrec::data::synth::{synthesize, SynthConfig};
use xsrec::data::vocab::Vocab;
use xsrec::data::Event;
use xsrec::eval::{evaluate, EvalOptions};
use xsrec::model::{encode, Batch, Features, HistoryView, ModelConfig, Scorer, SeqModel, WindowPolicy};
use xsrec::train::{train, TrainConfig};

const MAX_LEN: usize = 30;
const GAP: i64 = 1800;

/// A synthetic log in which no user has an item twice, then each event after a user's first is,
/// with probability `rate`, replaced by one of the items that user had before it (uniformly).
fn log_with_repeat_rate(rate: f64, seed: u64) -> Vec<Event> {
    let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in synthesize(&SynthConfig::new(3000, 600, seed)) {
        by_user.entry(event.user_id.clone()).or_default().push(event);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut log = Vec::new();
    for mut events in by_user.into_values() {
        events.sort_by_key(|e| e.timestamp);
        let mut had: HashSet<String> = HashSet::new();
        events.retain(|e| had.insert(e.item_id.clone()));
        let mut items: Vec<String> = Vec::new();
        for mut event in events {
            if !items.is_empty() && rng.gen_bool(rate) {
                event.item_id = items[rng.gen_range(0..items.len())].clone();
            }
            items.push(event.item_id.clone());
            log.push(event);
        }
    }
    log
}

fn trained(set: &SequenceSet, seed: u64) -> SeqModel {
    let config = ModelConfig {
        dropout: 0.2,
        features: Features {
            repeat_term: true,
            session_successor: false,
            clock_readout: false,
            ..Features::default()
        },
        ..common::small_model(set, MAX_LEN, 16)
    };
    let cfg = TrainConfig {
        mask_seen: false,
        ..common::quick_training(seed, 30)
    };
    train(set, config, &cfg).expect("trains").model
}

/// Over the training events after each user's first (`last_test` false) or over each user's test
/// event: the mean probability the model gives the items the user had before the event, and
/// the share of those events that are such an item.
fn held_mass_and_rate(model: &SeqModel, set: &SequenceSet, last_test: bool) -> (f64, f64) {
    let cases: Vec<(usize, usize)> = set
        .users
        .iter()
        .enumerate()
        .flat_map(|(u, user)| {
            let positions = match (last_test, user.target_position(Target::Test)) {
                (true, Some(test)) => test..test + 1,
                (false, Some(_)) => 1..user.train_len(),
                (_, None) => 0..0,
            };
            positions.map(move |p| (u, p))
        })
        .collect();
    let (mut mass, mut repeats) = (0.0, 0);
    for chunk in cases.chunks(256) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|&(u, p)| {
                let user = &set.users[u];
                let view = HistoryView::new(&user.items, &user.timestamps, &user.types).prefix(p);
                encode(view, user.timestamps[p], MAX_LEN, GAP)
            })
            .collect();
        let held: Vec<&[u32]> = chunk.iter().map(|&(u, p)| &set.users[u].items[..p]).collect();
        let scores = model.score_next(&Batch::new(&rows, Device::Cpu), &held);
        let _ = scores.narrow(1, 0, 1).fill_(f64::NEG_INFINITY);
        let probabilities: Vec<Vec<f32>> = Vec::try_from(scores.softmax(-1, Kind::Float)).unwrap();
        for ((&(u, p), had), row) in chunk.iter().zip(&held).zip(&probabilities) {
            let distinct: HashSet<u32> = had.iter().copied().collect();
            mass += distinct.iter().map(|&i| f64::from(row[i as usize])).sum::<f64>();
            repeats += usize::from(distinct.contains(&set.users[u].items[p]));
        }
    }
    (mass / cases.len() as f64, repeats as f64 / cases.len() as f64)
}

fn mean_ndcg10(model: &SeqModel, set: &SequenceSet, exclude_seen: bool) -> f64 {
    let options = EvalOptions {
        target: Target::Test,
        exclude_seen,
        batch_size: 256,
        max_len: MAX_LEN,
        session_gap_secs: GAP,
        device: Device::Cpu,
        window: WindowPolicy::Newest,
    };
    let results = evaluate(model, set, &options);
    let ndcg = |rank: usize| {
        if rank < 10 {
            1.0 / (rank as f64 + 2.0).log2()
        } else {
            0.0
        }
    };
    results.iter().map(|r| ndcg(r.rank)).sum::<f64>() / results.len() as f64
}

/// Per case (a rate of 0 and two drawn ones), trained with the seen items in the softmax: the mass
/// the model puts on held items over the training events is the share of repeats among them
/// (the oracle: the rate the log was drawn with, measured on the same events) to within 0.1. It
/// leans above it (0.353 against 0.269, 0.624 against 0.578 when written): the kept weights are
/// those of the best validation epoch (7 and 21 of 30), before the term's bias has settled, and
/// the offset is one number per state, so the mass grows with the number of held items. It rises
/// with the rate across cases; with no repeats, ranking the seen items too costs nothing.
#[test]
fn the_mass_on_held_items_matches_the_repeat_rate_and_no_repeats_cost_no_ndcg() {
    let mut draw = ChaCha8Rng::seed_from_u64(2026);
    let rates = [0.0, draw.gen_range(0.15..0.35), draw.gen_range(0.5..0.8)];
    let mut at_test = Vec::new();
    for &rate in &rates {
        let seed = draw.gen_range(0..1_000);
        let set = build_sequences(&log_with_repeat_rate(rate, seed), Vocab::new(), Vocab::new(), true);
        let model = trained(&set, seed);
        let (mass, share) = held_mass_and_rate(&model, &set, false);
        let (test_mass, test_share) = held_mass_and_rate(&model, &set, true);
        eprintln!(
            "rate {rate:.3}: training events {share:.3} repeats, mass {mass:.3}; test events {test_share:.3}, mass {test_mass:.3}"
        );
        assert!(
            (share - rate).abs() < 0.02,
            "the log's repeat share {share:.3} for rate {rate:.3}"
        );
        assert!(
            (mass - share).abs() < 0.1,
            "rate {rate:.3}: mass {mass:.3} on held items, share {share:.3}"
        );
        at_test.push(test_mass);
        if rate == 0.0 {
            let (masked, unmasked) = (mean_ndcg10(&model, &set, true), mean_ndcg10(&model, &set, false));
            eprintln!("  NDCG@10 masked {masked:.4}, unmasked {unmasked:.4}");
            assert!(unmasked >= 0.97 * masked, "masked {masked:.4}, unmasked {unmasked:.4}");
        }
    }
    assert!(at_test.windows(2).all(|w| w[0] < w[1]), "test-event masses {at_test:?}");
}

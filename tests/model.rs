//! Model-level behaviour: causality, attention-kernel parity, batch independence, artifact
//! round-trips and load-time validation.
use tch::{Device, Kind, Tensor};
use xsrec::data::vocab::Vocab;
use xsrec::model::artifact::{Artifact, FORMAT_VERSION};
use xsrec::model::input::moment_key;
use xsrec::model::{encode, Arch, Batch, Combine, Features, HistoryView, ModelConfig, Scorer, SeqModel};

const MAX_LEN: usize = 16;
const GAP: i64 = 1800;

fn config(arch: Arch, combine: Combine) -> ModelConfig {
    ModelConfig {
        arch,
        num_items: 30,
        num_event_types: 4,
        max_len: MAX_LEN,
        d_model: 16,
        n_heads: 2,
        n_layers: 2,
        ffn_dim: 32,
        dropout: 0.1,
        tied_output: arch == Arch::Transformer,
        // Every feature on, the opt-in ones included, so each is held to causality and parity.
        features: Features {
            combine,
            session_summary: true,
            repeat_term: true,
            ..Features::default()
        },
        session_gap_secs: GAP,
    }
}

fn model(arch: Arch, combine: Combine) -> SeqModel {
    model_of(config(arch, combine))
}

fn model_of(config: ModelConfig) -> SeqModel {
    tch::manual_seed(3);
    let model = SeqModel::new(config, Device::Cpu);
    // Random non-zero session biases and readout gates (all start at zero), so the test sees
    // those features at work.
    tch::no_grad(|| {
        for (name, mut t) in model.vs.variables() {
            if name.contains("session_bias") || name.ends_with("gate.weight") {
                t.copy_(&Tensor::randn_like(&t));
            }
        }
    });
    model
}

struct History {
    items: Vec<u32>,
    timestamps: Vec<i64>,
    types: Vec<u32>,
}

fn history() -> History {
    // Three sessions, gaps of seconds inside and hours between.
    let timestamps = vec![
        0, 30, 95, 7_300, 7_320, 7_400, 40_000, 40_010, 40_100, 40_160, 40_200, 40_260,
    ];
    History {
        items: (0..timestamps.len() as u32).map(|i| 1 + (i * 7) % 29).collect(),
        types: (0..timestamps.len() as u32).map(|i| 1 + i % 3).collect(),
        timestamps,
    }
}

/// The shared history as a one-row batch predicting at 40,300 s.
fn history_batch(h: &History) -> Batch {
    Batch::new(
        &[encode(
            HistoryView::new(&h.items, &h.timestamps, &h.types),
            40_300,
            MAX_LEN,
            GAP,
        )],
        Device::Cpu,
    )
}

fn all_hidden(model: &SeqModel, h: &History, at: i64) -> Tensor {
    let row = encode(HistoryView::new(&h.items, &h.timestamps, &h.types), at, MAX_LEN, GAP);
    tch::no_grad(|| model.net.hidden(&Batch::new(&[row], Device::Cpu), false)).get(0)
}

fn variants() -> Vec<SeqModel> {
    vec![
        model(Arch::Transformer, Combine::Sum),
        model(Arch::Transformer, Combine::Concat),
        model(Arch::Lstm, Combine::Sum),
    ]
}

/// Whether two hidden states agree to within float rounding. Exact equality is not promised:
/// the same positions computed in two passes differed by one ulp (1.2e-7) now and then when the
/// tests ran in parallel (the BLAS kernels' paths follow the buffers' alignment); a change that
/// leaks backwards moves a state by orders of magnitude more.
fn same_states(a: &Tensor, b: &Tensor) -> bool {
    (a - b).abs().max().double_value(&[]) <= 1e-5
}

#[test]
fn changing_a_later_event_never_changes_an_earlier_position() {
    for model in variants() {
        let base = history();
        let n = base.items.len();
        let pad = MAX_LEN - n;
        let before = all_hidden(&model, &base, 40_300);
        for j in 1..n {
            let mut changed = history();
            changed.items[j] = changed.items[j] % 29 + 1;
            changed.types[j] = 1 + (changed.types[j] % 3);
            let after = all_hidden(&model, &changed, 40_300);
            let earlier = |t: &Tensor| t.narrow(0, 0, (pad + j) as i64);
            assert!(
                same_states(&earlier(&before), &earlier(&after)),
                "{:?}: item change at {j} leaked backwards",
                model.config.arch
            );
            assert!(
                !same_states(&before.get((pad + j) as i64), &after.get((pad + j) as i64)),
                "item change at {j} had no effect"
            );

            // A timestamp is also the prediction moment of the event before it, so it may change
            // positions j-1 and later only.
            let mut shifted = history();
            for ts in &mut shifted.timestamps[j..] {
                *ts += 100_000;
            }
            let after = all_hidden(&model, &shifted, 140_300);
            let upto = (pad + j - 1) as i64;
            assert!(
                same_states(&before.narrow(0, 0, upto), &after.narrow(0, 0, upto)),
                "time change at {j} leaked backwards"
            );
            assert!(
                !same_states(&before.get(upto + 1), &after.get(upto + 1)),
                "time change at {j} had no effect"
            );
        }
    }
}

#[test]
fn explicit_attention_matches_fused_kernel() {
    for combine in [Combine::Sum, Combine::Concat] {
        let model = model(Arch::Transformer, combine);
        let h = history();
        let batch = history_batch(&h);
        let mut weights = Vec::new();
        let (fused, explicit) = tch::no_grad(|| {
            (
                model.net.hidden(&batch, false),
                model.net.hidden_with_attention(&batch, false, Some(&mut weights)),
            )
        });
        let diff = (fused - explicit).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max diff {diff}");
        assert_eq!(weights.len(), 2);
        // Each query's weights form a distribution over allowed keys only.
        let sums = weights[0].sum_dim_intlist(-1, false, Kind::Float);
        assert!((sums - 1.0).abs().max().double_value(&[]) < 1e-5);
        let future = weights[0]
            .get(0)
            .get(0)
            .triu(1)
            .abs()
            .sum(Kind::Float)
            .double_value(&[]);
        assert_eq!(future, 0.0, "attention to future positions");
        let attention = model.last_position_attention(&batch);
        let padding_mass: f32 = attention[0][..MAX_LEN - h.items.len()].iter().sum();
        assert_eq!(padding_mass, 0.0, "the newest position attends to padding");
    }
}

/// The inference cache's rule held against the model: for random histories and moments, with
/// the calendar input on and off and for both encoders, two moments with the same
/// [`moment_key`] give the very same state before the clock readout (what the cache keeps), and
/// [`SeqModel::read_clock`] of that state is the full answer at either moment. Moments an hour
/// apart share a key where only the clock readout reads the hour, and their answers differ
/// there: the readout added after the cache is not a no-op.
#[test]
fn moments_with_the_same_key_give_the_same_state_before_the_clock_readout() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(17);
    for calendar in [false, true] {
        for arch in [Arch::Transformer, Arch::Lstm] {
            let mut config = config(arch, Combine::Sum);
            config.features.calendar = calendar;
            let model = model_of(config);
            let features = &model.config.features;
            let mut hour_apart_differs = 0;
            for _ in 0..12 {
                let n = rng.gen_range(1..MAX_LEN + 4);
                let mut t = rng.gen_range(0..1_000_000i64);
                let timestamps: Vec<i64> = (0..n)
                    .map(|_| {
                        t += [5, 60, 2_000, 90_000][rng.gen_range(0..4)];
                        t
                    })
                    .collect();
                let items: Vec<u32> = (0..n).map(|_| rng.gen_range(1..30)).collect();
                let types: Vec<u32> = (0..n).map(|_| rng.gen_range(1..4)).collect();
                let view = || HistoryView::new(&items, &timestamps, &types);
                // Moments an hour apart from a random gap on, and some anywhere.
                let from = t + rng.gen_range(0..200_000);
                let mut moments: Vec<i64> = (0..4).map(|hours| from + 3_600 * hours).collect();
                moments.extend((0..3).map(|_| t + rng.gen_range(0..500_000)));
                let batch = |at| Batch::new(&[encode(view(), at, MAX_LEN, GAP)], Device::Cpu);
                let states: Vec<Tensor> = moments.iter().map(|&at| model.last_state(&batch(at))).collect();
                for (a, &at_a) in moments.iter().enumerate() {
                    let full = model.last_hidden(&batch(at_a));
                    assert!(same_states(
                        &model.read_clock(states[a].shallow_clone(), &batch(at_a)),
                        &full
                    ));
                    for (b, &at_b) in moments.iter().enumerate() {
                        let key = |at| moment_key(view(), at, features, GAP);
                        if a == b || key(at_a) != key(at_b) {
                            continue;
                        }
                        assert!(
                            same_states(&states[a], &states[b]),
                            "{arch:?} calendar {calendar}: moments {at_a} and {at_b} share a key, not a state"
                        );
                        // The cached state with the other moment's clock readout is its answer.
                        let served = model.read_clock(states[a].shallow_clone(), &batch(at_b));
                        assert!(same_states(&served, &model.last_hidden(&batch(at_b))));
                        hour_apart_differs += usize::from(!same_states(&served, &full));
                    }
                }
            }
            if !calendar {
                assert!(
                    hour_apart_differs > 0,
                    "{arch:?}: no pair of moments read different hours"
                );
            }
        }
    }
}

#[test]
fn a_row_scores_the_same_alone_and_in_a_batch() {
    for model in variants() {
        let h = history();
        let rows: Vec<_> = (3..=h.items.len())
            .map(|n| {
                let view = HistoryView::new(&h.items, &h.timestamps, &h.types).prefix(n);
                encode(view, h.timestamps[n - 1] + 60, MAX_LEN, GAP)
            })
            .collect();
        let had: Vec<&[u32]> = (3..=h.items.len()).map(|n| &h.items[..n]).collect();
        let batched = model.score_next(&Batch::new(&rows, Device::Cpu), &had);
        for (i, row) in rows.iter().enumerate() {
            let alone = model.score_next(&Batch::new(std::slice::from_ref(row), Device::Cpu), &had[i..=i]);
            let diff = (batched.get(i as i64) - alone.get(0)).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{:?} row {i}: {diff}", model.config.arch);
        }
    }
}

fn artifact(model: SeqModel) -> Artifact {
    let items = Vocab::from_ids((1..30).map(|i| format!("item{i}")));
    let event_types = Vocab::from_ids(["".to_string(), "view".into(), "buy".into()]);
    let item_categories = (0..30)
        .map(|i| match i % 2 {
            1 => vec!["Drama".to_string(), "War".into()],
            _ => vec![],
        })
        .collect();
    let info = serde_json::json!({"note": "test"});
    Artifact::new(model, items, event_types, (0..30).collect(), item_categories, info)
}

#[test]
fn artifact_round_trip_reproduces_scores_exactly() {
    for model in variants() {
        let dir = tempfile::tempdir().unwrap();
        let h = history();
        let batch = history_batch(&h);
        let before = model.score_next(&batch, &[&h.items]);
        let saved = artifact(model);
        saved.save(dir.path()).unwrap();
        let loaded = Artifact::load(dir.path(), Device::Cpu).unwrap();
        assert!(
            before.equal(&loaded.model.score_next(&batch, &[&h.items])),
            "scores changed after reload"
        );
        assert_eq!(loaded.items, saved.items);
        assert_eq!(loaded.event_types, saved.event_types);
        assert_eq!(loaded.item_counts, saved.item_counts);
        assert_eq!(loaded.item_categories, saved.item_categories);
        assert_eq!(loaded.config.model, saved.config.model);
    }
}

fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, value.to_string()).unwrap();
}

fn load_error(dir: &std::path::Path) -> String {
    match Artifact::load(dir, Device::Cpu) {
        Ok(_) => panic!("load should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loader_rejects_mismatched_or_unknown_artifacts_with_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    artifact(model(Arch::Transformer, Combine::Sum))
        .save(dir.path())
        .unwrap();

    edit_config(dir.path(), |v| v["model"]["ffn_dim"] = 48.into());
    let err = load_error(dir.path());
    assert!(
        err.contains("tensor `transformer.block0.ffn_in.bias`") && err.contains("[32]") && err.contains("[48]"),
        "{err}"
    );

    edit_config(dir.path(), |v| {
        v["model"]["ffn_dim"] = 32.into();
        v["model"]["features"]["time_gap"] = false.into();
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("tensor `gap_embedding.weight`") && err.contains("not part of the configured model"),
        "{err}"
    );

    edit_config(dir.path(), |v| v["format_version"] = 99.into());
    assert!(load_error(dir.path()).contains("format_version 99 is not supported"));

    edit_config(dir.path(), |v| {
        v["format_version"] = FORMAT_VERSION.into();
        v["model"].as_object_mut().unwrap().remove("max_len");
    });
    assert!(load_error(dir.path()).contains("missing field `max_len`"));
}

#[test]
fn every_parameter_gets_a_gradient() {
    for model in variants() {
        let h = history();
        let batch = history_batch(&h);
        let hidden = model.net.hidden(&batch, true);
        let positions = hidden.size()[1];
        // The repeat term reads each position's items so far.
        let (mut rows, mut columns) = (Vec::new(), Vec::new());
        for position in 0..positions {
            for item in Vec::<i64>::try_from(batch.items.get(0).narrow(0, 0, position + 1)).unwrap() {
                rows.push(position);
                columns.push(item);
            }
        }
        model
            .net
            .score_with_repeats(&hidden.get(0), &rows, &columns)
            .logsumexp([-1], false)
            .sum(Kind::Float)
            .backward();
        for (name, var) in model.vs.variables() {
            let grad = var.grad();
            assert!(grad.defined(), "{name}: no gradient");
            assert!(
                grad.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{:?} {name}: zero gradient",
                model.config.arch
            );
        }
    }
}

#[test]
fn bf16_inference_keeps_the_default_models_top10() {
    use xsrec::bench::parity::{agreement, cases_from_users, rank_cases};
    use xsrec::infer::rank::Retrieval;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("data/ml-100k/ml-100k.inter");
    assert!(data.exists(), "{} is missing: run `make data`", data.display());
    let fp32 = Artifact::load(&root.join("models/default"), Device::Cpu).unwrap();
    let mut bf16 = Artifact::load(&root.join("models/default"), Device::Cpu).unwrap().model;
    bf16.set_precision(xsrec::model::Precision::Bf16);
    assert_eq!(bf16.net.item_table().kind(), Kind::BFloat16);
    let events = xsrec::data::formats::load_events(&data, &Default::default())
        .unwrap()
        .events;
    let set = xsrec::data::split::build_sequences(&events, fp32.items.clone(), fp32.event_types.clone(), false);
    let cases = cases_from_users(&set.users, 300, 3, &fp32.model);
    let reference = rank_cases(&fp32.model, &cases, 10, 64, Retrieval::Exact);
    // Batching must not change fp32 answers; bf16 may swap near-ties but not the list.
    assert_eq!(
        agreement(&reference, &rank_cases(&fp32.model, &cases, 10, 7, Retrieval::Exact)).identical_lists,
        300
    );
    let found = agreement(&reference, &rank_cases(&bf16, &cases, 10, 64, Retrieval::Exact));
    assert!(found.mean_overlap >= 9.0, "{found:?}");
    assert!(found.max_abs_score_diff < 0.2, "{found:?}");
}

/// Keys and values stored in bf16 (`--cache-precision bf16`) are held to the bound bf16
/// inference is held to: the default model's weights, read with positions from the window
/// start, on 100 ml-100k users revealed 1–3 events at a time up to the window; every step's
/// top 10 from the bf16 store against a full fp32 pass.
#[test]
fn bf16_keys_and_values_keep_the_top10_of_a_full_pass() {
    use rand::{Rng, SeedableRng};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let mut artifact = Artifact::load(&root.join("models/default"), Device::Cpu).unwrap();
    artifact.config.model.features.positions = xsrec::model::PositionOrigin::WindowStart;
    artifact.save(dir.path()).unwrap();
    let artifact = Artifact::load(dir.path(), Device::Cpu).unwrap();
    let model = &artifact.model;
    let (max_len, gap) = (model.config.max_len, model.config.session_gap_secs);
    let events = xsrec::data::formats::load_events(&root.join("data/ml-100k/ml-100k.inter"), &Default::default())
        .unwrap()
        .events;
    let set = xsrec::data::split::build_sequences(&events, artifact.items.clone(), artifact.event_types.clone(), false);
    let users: Vec<_> = set.users.iter().take(100).collect();
    let mut pool = model.net.prefix_pool(1 << 30, Kind::BFloat16).expect("appendable");
    let slots: Vec<xsrec::model::Slot> = users.iter().map(|_| pool.allocate().unwrap()).collect();
    let mut revealed = vec![0usize; users.len()];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let top10 = |scores: &Tensor| Vec::<i64>::try_from(scores.topk(10, 1, true, true).1.view(-1)).unwrap();
    let (mut overlap, mut lists, mut worst) = (0usize, 0usize, 0f64);
    for _ in 0..max_len / 2 {
        let rows: Vec<_> = users
            .iter()
            .zip(&mut revealed)
            .map(|(user, n)| {
                *n = (*n + rng.gen_range(1..=3)).min(user.items.len().min(max_len));
                let view = HistoryView::new(&user.items, &user.timestamps, &user.types).prefix(*n);
                encode(view, user.timestamps[*n - 1] + 600, max_len, gap)
            })
            .collect();
        let batch = Batch::new(&rows, Device::Cpu);
        let had: Vec<&[u32]> = users.iter().zip(&revealed).map(|(user, &n)| &user.items[..n]).collect();
        let full = model.score_next(&batch, &had);
        let held: Vec<&xsrec::model::Slot> = slots.iter().collect();
        let stepped: Vec<usize> = (0..users.len())
            .filter(|&u| pool.len(&slots[u]) < revealed[u])
            .collect();
        let state = model.extend_last_state(&batch, &mut pool, &held).expect("appendable");
        let incremental = model.net.score(&model.read_clock(state, &batch));
        worst = worst.max((&full - &incremental).abs().max().double_value(&[]));
        let (a, b) = (top10(&full), top10(&incremental));
        for u in stepped {
            let (a, b) = (&a[u * 10..u * 10 + 10], &b[u * 10..u * 10 + 10]);
            overlap += a.iter().filter(|item| b.contains(item)).count();
            lists += 1;
        }
    }
    let mean_overlap = overlap as f64 / lists as f64;
    assert!(mean_overlap >= 9.0, "mean top-10 overlap {mean_overlap}");
    assert!(worst < 0.2, "largest score difference {worst}");
}

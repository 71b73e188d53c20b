//! Progressive unfreezing (seed Strategy 5): at given global steps, parameters whose names start with given
//! prefixes become trainable.
//!
//! Prefixes follow [`crate::params::ParamStore::set_prefix_trainable`] (a name matches when it *starts with*
//! the prefix). The seed's example patterns matched no parameter of the real model (reference-model.md §11),
//! so [`UnfreezeSchedule::validate`] rejects any prefix that matches nothing before training starts.
//!
//! Text form (one string per entry, TOML-friendly): `"STEP:PREFIX[,PREFIX...]"`, e.g.
//! `"500:sasrec.blocks.1,retriever.proj"`.

use serde::{Deserialize, Serialize};

/// Parameters to unfreeze at `step`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfreezeEvent {
    pub step: usize,
    pub prefixes: Vec<String>,
}

/// The schedule and how far it has been applied (part of the trainer's checkpointed state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnfreezeSchedule {
    /// Sorted by step (stable: entries of the same step keep their order).
    pub events: Vec<(usize, Vec<String>)>,
    /// Entries already returned by [`UnfreezeSchedule::due`].
    next: usize,
}

impl UnfreezeSchedule {
    /// A schedule from `(step, prefixes)` entries in any order.
    pub fn new(mut events: Vec<(usize, Vec<String>)>) -> UnfreezeSchedule {
        events.sort_by_key(|e| e.0);
        UnfreezeSchedule { events, next: 0 }
    }

    /// Parses entries of the form `"STEP:PREFIX[,PREFIX...]"` (spaces around items are ignored).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<UnfreezeSchedule, String> {
        let events = entries
            .iter()
            .map(|e| Self::parse_entry(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(events))
    }

    fn parse_entry(entry: &str) -> Result<(usize, Vec<String>), String> {
        let bad = |why: &str| {
            format!("unfreeze entry {entry:?}: {why} (expected \"STEP:PREFIX[,PREFIX...]\", e.g. \"500:sasrec.blocks.1\")")
        };
        let (step, list) = entry.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let step: usize = step.trim().parse().map_err(|_| {
            bad(&format!(
                "step {:?} is not a non-negative integer",
                step.trim()
            ))
        })?;
        let prefixes: Vec<String> = list.split(',').map(|p| p.trim().to_string()).collect();
        if prefixes.iter().any(String::is_empty) {
            return Err(bad("empty parameter-name prefix"));
        }
        Ok((step, prefixes))
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Entries not yet returned by [`UnfreezeSchedule::due`].
    pub fn pending(&self) -> usize {
        self.events.len() - self.next
    }

    /// Every entry with `entry.step <= step` not returned before, in step order; each entry is returned
    /// exactly once, also when steps are skipped.
    pub fn due(&mut self, step: usize) -> Vec<UnfreezeEvent> {
        let mut out = Vec::new();
        while self.next < self.events.len() && self.events[self.next].0 <= step {
            let (s, p) = &self.events[self.next];
            out.push(UnfreezeEvent {
                step: *s,
                prefixes: p.clone(),
            });
            self.next += 1;
        }
        out
    }

    /// Errors when a prefix matches no name in `param_names`, listing every such prefix.
    pub fn validate(&self, param_names: &[&str]) -> Result<(), String> {
        let unmatched: Vec<String> = self
            .events
            .iter()
            .flat_map(|(step, ps)| ps.iter().map(move |p| (step, p)))
            .filter(|(_, p)| !param_names.iter().any(|n| n.starts_with(p.as_str())))
            .map(|(step, p)| format!("{p:?} (step {step})"))
            .collect();
        if unmatched.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = param_names.iter().take(8).copied().collect();
        Err(format!(
            "unfreeze schedule: prefix{} {} match{} no parameter name; names start e.g. {:?}{} \
             (`ur4rec-engine info --params` lists all {})",
            if unmatched.len() > 1 { "es" } else { "" },
            unmatched.join(", "),
            if unmatched.len() > 1 { "" } else { "es" },
            shown,
            if param_names.len() > shown.len() {
                ", ..."
            } else {
                ""
            },
            param_names.len()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 5] = [
        "sasrec.item_embedding",
        "sasrec.blocks.0.attn.w_qkv",
        "sasrec.blocks.1.attn.w_qkv",
        "retriever.proj.w1",
        "retriever.items",
    ];

    #[test]
    fn parses_and_sorts() {
        let s = UnfreezeSchedule::parse(&[
            "500:sasrec.blocks.1, retriever.proj",
            "0:sasrec.item_embedding",
            "500:retriever.items",
        ])
        .unwrap();
        assert_eq!(
            s.events,
            vec![
                (0, vec!["sasrec.item_embedding".to_string()]),
                (
                    500,
                    vec!["sasrec.blocks.1".to_string(), "retriever.proj".to_string()]
                ),
                (500, vec!["retriever.items".to_string()]),
            ]
        );
        assert_eq!(s.pending(), 3);
        s.validate(&NAMES).unwrap();
    }

    #[test]
    fn rejects_malformed_entries() {
        for (e, why) in [
            ("500", "no ':'"),
            ("x:sasrec", "not a non-negative integer"),
            ("-1:sasrec", "not a non-negative integer"),
            ("5:", "empty"),
            ("5:a,,b", "empty"),
        ] {
            let err = UnfreezeSchedule::parse(&[e]).unwrap_err();
            assert!(err.contains(why) && err.contains(e), "{e}: {err}");
        }
    }

    #[test]
    fn each_event_fires_once_even_when_steps_are_skipped() {
        let mut s = UnfreezeSchedule::parse(&["10:a", "0:b", "20:c", "20:d", "35:e"]).unwrap();
        let steps = |v: Vec<UnfreezeEvent>| {
            v.into_iter()
                .map(|e| (e.step, e.prefixes[0].clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(steps(s.due(0)), vec![(0, "b".to_string())]);
        assert_eq!(steps(s.due(0)), vec![]);
        assert_eq!(steps(s.due(9)), vec![]);
        // 10 and both 20s at once when the caller jumps to 25.
        assert_eq!(
            steps(s.due(25)),
            vec![(10, "a".into()), (20, "c".into()), (20, "d".into())]
        );
        assert_eq!(s.pending(), 1);
        // The cursor survives a checkpoint.
        let mut back: UnfreezeSchedule =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(steps(back.due(1000)), vec![(35, "e".into())]);
        assert!(back.due(2000).is_empty());
        assert_eq!(back.pending(), 0);
    }

    #[test]
    fn validate_names_prefixes_that_match_nothing() {
        // The seed's example patterns: none is a prefix of a real name.
        let s = UnfreezeSchedule::parse(&[
            "0:sasrec.attention,retriever.proj",
            "1000:preference_retriever.projection",
        ])
        .unwrap();
        let err = s.validate(&NAMES).unwrap_err();
        assert!(err.contains("\"sasrec.attention\" (step 0)"), "{err}");
        assert!(
            err.contains("\"preference_retriever.projection\" (step 1000)"),
            "{err}"
        );
        assert!(!err.contains("\"retriever.proj\""), "{err}");
        // A substring in the middle of a name is not a prefix.
        assert!(UnfreezeSchedule::parse(&["0:blocks.1"])
            .unwrap()
            .validate(&NAMES)
            .is_err());
        assert!(UnfreezeSchedule::default().validate(&NAMES).is_ok());
    }
}

//! The interaction readers (MovieLens tab / `::`, SASRec pairs and lists, RecBole `.inter`) through
//! `data::load`. The first byte picks the format (or auto-detection from a `.txt` name, which runs the
//! pairs/lists sniffing) and the minimum user length; the rest is the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ur4rec_engine::data::{load, Format, LoadOptions};
use ur4rec_engine_fuzz::{assert_names_file, scratch_file};

const FORMATS: [(Option<Format>, &str); 6] = [
    (Some(Format::MovieLensTab), "u.data"),
    (Some(Format::MovieLensDat), "ratings.dat"),
    (Some(Format::SasRecPairs), "pairs.txt"),
    (Some(Format::SasRecLists), "lists.txt"),
    (Some(Format::RecBoleInter), "x.inter"),
    (None, "auto.txt"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let (format, name) = FORMATS[(sel & 7) as usize % FORMATS.len()];
    let opts = LoadOptions {
        format,
        // A rating filter on half the inputs, so the filtered-out paths run too.
        min_rating: if sel & 8 != 0 { Some(3.0) } else { None },
        min_items_per_user: (sel >> 4) as usize % 4,
    };
    let path = scratch_file(name, body);
    match load(&path, &opts) {
        Ok(ds) => {
            // The invariants the rest of the engine indexes by: dense ids 1..=num_items, one sequence per user.
            assert_eq!(ds.sequences.len(), ds.num_users);
            assert_eq!(ds.user_original.len(), ds.num_users);
            assert_eq!(ds.item_original.len(), ds.num_items);
            for s in &ds.sequences {
                assert!(s.len() >= opts.min_items_per_user.max(1));
                assert!(s.iter().all(|&i| i >= 1 && i as usize <= ds.num_items));
            }
        }
        Err(e) => assert_names_file(&e.to_string(), &path),
    }
});

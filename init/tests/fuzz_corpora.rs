//! Every input the fuzzers kept (`fuzz/corpus/init_<target>/`, seeds included) runs through
//! its decoder here, so CI replays what fuzzing found without a nightly toolchain.

use std::path::Path;

#[test]
fn every_corpus_input_decodes_without_a_panic() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, target) in shoal_init::fuzzing::TARGETS {
        let dir = corpora.join(format!("init_{name}"));
        let inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        assert!(!inputs.is_empty(), "{} has no inputs", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            target(&data);
        }
    }
}

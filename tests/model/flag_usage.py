"""FlagEmbedding's BGE-M3 usage (its README's calls), run by test_flag_model.py in a fresh process against
either implementation: ``python flag_usage.py {flagembedding|bgem3_lib} MODEL_DIR OUT_JSON``.

The only line that differs between the two runs is the import, as for a user switching libraries.
"""
import json
import sys


def main(impl: str, model_dir: str, out_path: str) -> None:
    if impl == "flagembedding":
        from FlagEmbedding import BGEM3FlagModel
    elif impl == "bgem3_lib":
        from bgem3_lib import BGEM3FlagModel
    else:
        sys.exit(f"unknown implementation {impl!r}")

    model = BGEM3FlagModel(model_dir, use_fp16=True)
    queries = ["Who wrote Faust?", "Wie hoch ist der Mont Blanc?"]
    passages = ["Faust is a tragic play by Johann Wolfgang von Goethe, published in two parts in 1808 and 1832.",
                "Der Mont Blanc ist mit 4806 Metern der höchste Berg der Alpen und liegt an der Grenze zu Italien."]

    # dense
    dense_1 = model.encode(queries, batch_size=12, max_length=8192)["dense_vecs"]
    dense_2 = model.encode(passages)["dense_vecs"]
    similarity = dense_1 @ dense_2.T
    # lexical weights
    out_1 = model.encode(queries, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    out_2 = model.encode(passages, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    tokens = model.convert_id_to_token(out_1["lexical_weights"])
    one_token_dict = model.convert_id_to_token(out_2["lexical_weights"][1])
    lexical = model.compute_lexical_matching_score(out_1["lexical_weights"][0], out_2["lexical_weights"][0])
    lexical_matrix = model.compute_lexical_matching_score(out_1["lexical_weights"], out_2["lexical_weights"])
    # multi-vector
    colbert = model.colbert_score(out_1["colbert_vecs"][0], out_2["colbert_vecs"][0])
    # all modes with weights
    pairs = [[q, p] for q in queries for p in passages]
    scores = model.compute_score(pairs, max_passage_length=128, weights_for_different_modes=[0.4, 0.2, 0.4])
    one_pair = model.compute_score(pairs[0])
    # query / corpus helpers, a single string
    q_enc = model.encode_queries(queries, return_sparse=True)
    c_enc = model.encode_corpus(passages, return_colbert_vecs=True)
    single = model.encode(queries[0])["dense_vecs"]

    with open(out_path, "w") as f:
        json.dump({
            "similarity": similarity.tolist(),
            "tokens": [{k: float(v) for k, v in d.items()} for d in tokens],
            "one_token_dict": {k: float(v) for k, v in one_token_dict.items()},
            "lexical": float(lexical),
            "lexical_matrix": lexical_matrix.tolist(),
            "colbert": float(colbert),
            "scores": {k: [float(x) for x in v] for k, v in scores.items()},
            "one_pair": {k: (v if isinstance(v, float) else [float(x) for x in v]) for k, v in one_pair.items()},
            "query_dense": q_enc["dense_vecs"].tolist(),
            "query_lexical": [{k: float(v) for k, v in d.items()} for d in q_enc["lexical_weights"]],
            "corpus_colbert": [v.tolist() for v in c_enc["colbert_vecs"]],
            "single": single.tolist(),
        }, f)
    print("ok")


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Tests of zinbgrad.data.readers on small files written in each original format."""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from zinbgrad.datasets import read_10x_h5, read_counts, read_loom, read_zeisel_txt
from zinbgrad.pp import select_top_variance_genes

# --------------------------------------------------------------------------- fixtures


def _planted_counts(n_cells: int, n_genes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.6)
    counts[:, 1] = 0  # an all-zero gene
    counts[2, :] = 0  # an all-zero cell
    return counts.astype(np.int64)


ZEISEL_CELLS = ["1772071015_C02", "1772071017_G12", "1772071017_A05", "1772071014_B06"]
ZEISEL_LEVEL1 = ["interneurons", "pyramidal SS", "oligodendrocytes", "interneurons"]
ZEISEL_LEVEL2 = ["Int10", "S1PyrL4", "Oligo1", "Int2"]
ZEISEL_GENES = ["Tspan12", "Tshz1", "Fnbp1l", "Adamts15", "Cldn12", "Tshz1"]  # dup name


def _write_zeisel(path: Path, counts: np.ndarray, *, name_in_first_column: bool = False) -> None:
    """Write the expression_mRNA_17-Aug-2014.txt layout (tab separated)."""
    meta = [
        ("tissue", ["sscortex", "ca1hippocampus", "sscortex", "sscortex"]),
        ("group #", ["1", "2", "4", "1"]),
        ("total mRNA mol", ["21580", "21748", "31642", "32916"]),
        ("well", ["11", "95", "33", "42"]),
        ("sex", ["1", "-1", "-1", "1"]),
        ("age", ["21", "20", "20", "21"]),
        ("diameter", ["0", "9.56", "11.1", "11.7"]),
        ("cell_id", ZEISEL_CELLS),
        ("level1class", ZEISEL_LEVEL1),
        ("level2class", ZEISEL_LEVEL2),
    ]
    n_cells = counts.shape[0]
    lines = []
    for key, values in meta:
        lead = [key, ""] if name_in_first_column else ["", key]
        lines.append("\t".join(lead + values))
    lines.append("\t".join([""] * (n_cells + 2)))  # filler row 10
    for g, name in enumerate(ZEISEL_GENES):
        lines.append("\t".join([name, str(g % 3 + 1)] + [str(v) for v in counts[:, g]]))
    text = "\r\n".join(lines) + "\r\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8", newline="")


def _write_loom(path: Path, counts: np.ndarray, *, chunks: tuple[int, int] = (2, 3)) -> None:
    n_cells, n_genes = counts.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=counts.T.astype(np.float32), chunks=chunks)
        ra = f.create_group("row_attrs")
        ra["Gene"] = np.array([f"gene{g}".encode() for g in range(n_genes)])
        ra["Accession"] = np.array([f"ENS{g:04d}".encode() for g in range(n_genes)])
        ca = f.create_group("col_attrs")
        ca["CellID"] = np.array([f"cell{c}".encode() for c in range(n_cells)])
        ca["BatchID"] = (np.arange(n_cells) % 2).astype(np.int64)
        ca["ClusterID"] = (np.arange(n_cells) % 3).astype(np.int64)
        ca["Embedding"] = np.arange(2 * n_cells, dtype=np.float64).reshape(n_cells, 2)
        f.create_group("layers")
        f.attrs["CellTypes"] = np.array([b"RBC", b"MG", b"BC5A"])


def _write_10x_v2(path: Path, counts: np.ndarray, genomes: tuple[str, ...] = ("mm10",)) -> None:
    n_cells, n_genes = counts.shape
    csc = sp.csc_matrix(counts.T)  # genes x cells, CSC: indptr over cells
    with h5py.File(path, "w") as f:
        for genome in genomes:
            g = f.create_group(genome)
            g["data"] = csc.data.astype(np.int32)
            g["indices"] = csc.indices.astype(np.int64)
            g["indptr"] = csc.indptr.astype(np.int64)
            g["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
            g["barcodes"] = np.array([f"AAAC{c:04d}-1".encode() for c in range(n_cells)])
            g["genes"] = np.array([f"ENSMUSG{g_:05d}".encode() for g_ in range(n_genes)])
            names = [f"Gene{g_}" for g_ in range(n_genes)]
            names[-1] = names[0]  # duplicated symbol
            g["gene_names"] = np.array([n.encode() for n in names])


def _write_10x_v3(path: Path, counts: np.ndarray) -> None:
    n_cells, n_genes = counts.shape
    csc = sp.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
        m["barcodes"] = np.array([f"TTTG{c:04d}-1".encode() for c in range(n_cells)])
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{g:05d}".encode() for g in range(n_genes)])
        feats["name"] = np.array([f"G{g}".encode() for g in range(n_genes)])
        ftype = [b"Gene Expression"] * (n_genes - 1) + [b"Antibody Capture"]
        feats["feature_type"] = np.array(ftype)
        feats["genome"] = np.array([b"GRCh38"] * n_genes)


def _dense(X: sp.spmatrix) -> np.ndarray:
    assert sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array)
    return X.toarray()


# --------------------------------------------------------------------------- Zeisel


@pytest.mark.parametrize("name_in_first_column", [False, True])
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_read_zeisel_roundtrip(tmp_path: Path, suffix: str, name_in_first_column: bool) -> None:
    counts = _planted_counts(4, len(ZEISEL_GENES))
    path = tmp_path / f"expression_mRNA_17-Aug-2014{suffix}"
    _write_zeisel(path, counts, name_in_first_column=name_in_first_column)

    adata = read_zeisel_txt(path)
    assert sp.isspmatrix_csr(adata.X)
    np.testing.assert_array_equal(_dense(adata.X), counts)
    assert list(adata.obs_names) == ZEISEL_CELLS
    assert list(adata.obs["cell_type"]) == ZEISEL_LEVEL1
    assert list(adata.obs["level1class"]) == ZEISEL_LEVEL1
    assert list(adata.obs["level2class"]) == ZEISEL_LEVEL2
    assert list(adata.obs["group"]) == [1, 2, 4, 1]
    assert list(adata.obs["sex"]) == [1, -1, -1, 1]
    np.testing.assert_allclose(adata.obs["diameter"], [0, 9.56, 11.1, 11.7])
    assert list(adata.obs["total_mrna_mol"]) == [21580, 21748, 31642, 32916]
    assert list(adata.var["gene_name"]) == ZEISEL_GENES
    assert adata.var_names.is_unique
    assert list(adata.var["gene_cluster"]) == ["1", "2", "3", "1", "2", "3"]


def test_read_zeisel_rejects_bad_files(tmp_path: Path) -> None:
    counts = _planted_counts(4, len(ZEISEL_GENES))
    good = tmp_path / "good.txt"
    _write_zeisel(good, counts)
    lines = good.read_text().splitlines()

    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:-1] + [lines[-1].rsplit("\t", 1)[0]]) + "\n")
    with pytest.raises(ValueError, match=r"short\.txt, line 16: .*expected 4"):
        read_zeisel_txt(short)

    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines[:-1] + [lines[-1].rsplit("\t", 1)[0] + "\tx"]) + "\n")
    with pytest.raises(ValueError, match=r"text\.txt, line 16: non-numeric count 'x'"):
        read_zeisel_txt(text)

    no_id = tmp_path / "no_id.txt"
    no_id.write_text("\n".join(line for line in lines if "cell_id" not in line) + "\n")
    with pytest.raises(ValueError, match="no 'cell_id' metadata row"):
        read_zeisel_txt(no_id)

    genes_only = tmp_path / "genes_only.txt"
    genes_only.write_text("\n".join(lines[11:]) + "\n")
    with pytest.raises(ValueError, match="no cell metadata rows"):
        read_zeisel_txt(genes_only)

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_zeisel_txt(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- loom


def test_read_loom_roundtrip(tmp_path: Path) -> None:
    counts = _planted_counts(7, 5, seed=1)
    path = tmp_path / "retina.loom"
    _write_loom(path, counts)

    adata = read_loom(path, block_elements=8)  # forces several row blocks
    assert sp.isspmatrix_csr(adata.X)
    np.testing.assert_array_equal(_dense(adata.X), counts)
    assert list(adata.var_names) == [f"gene{g}" for g in range(5)]
    assert list(adata.obs_names) == [f"cell{c}" for c in range(7)]
    assert list(adata.obs["batch"].astype(int)) == [c % 2 for c in range(7)]
    assert list(adata.obs["labels"].astype(int)) == [c % 3 for c in range(7)]
    names = ["RBC", "MG", "BC5A"]
    assert list(adata.obs["cell_type"]) == [names[c % 3] for c in range(7)]
    assert adata.obsm["Embedding"].shape == (7, 2)
    assert list(adata.var["Accession"]) == [f"ENS{g:04d}" for g in range(5)]

    explicit = read_loom(path, batch_key="BatchID", label_key="ClusterID")
    np.testing.assert_array_equal(_dense(explicit.X), counts)

    dropped = read_loom(path, drop_empty_cells=True)
    assert dropped.n_obs == 6 and "cell2" not in dropped.obs_names


def test_read_loom_errors(tmp_path: Path) -> None:
    counts = _planted_counts(4, 3)
    path = tmp_path / "x.loom"
    _write_loom(path, counts, chunks=(1, 2))
    with pytest.raises(ValueError, match="batch_key='Sample' is not a column attribute"):
        read_loom(path, batch_key="Sample")

    no_matrix = tmp_path / "no_matrix.loom"
    with h5py.File(no_matrix, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"no_matrix\.loom: no /matrix dataset"):
        read_loom(no_matrix)

    bad_len = tmp_path / "bad_len.loom"
    _write_loom(bad_len, counts, chunks=(1, 2))
    with h5py.File(bad_len, "a") as f:
        del f["col_attrs/BatchID"]
        f["col_attrs/BatchID"] = np.zeros(99)
    with pytest.raises(ValueError, match="col_attrs/BatchID has shape"):
        read_loom(bad_len)

    not_hdf5 = tmp_path / "text.loom"
    not_hdf5.write_text("hello")
    with pytest.raises(ValueError, match=r"text\.loom: not an HDF5 file"):
        read_loom(not_hdf5)


# --------------------------------------------------------------------------- 10x


def test_read_10x_v2_full_and_subsets(tmp_path: Path) -> None:
    counts = _planted_counts(9, 6, seed=2)
    path = tmp_path / "1M_neurons_filtered_gene_bc_matrices_h5.h5"
    _write_10x_v2(path, counts)

    full = read_10x_h5(path)
    assert sp.isspmatrix_csr(full.X)
    np.testing.assert_array_equal(_dense(full.X), counts)
    assert full.obs_names[0] == "AAAC0000-1"
    assert full.var_names.is_unique and full.var_names[0] == "Gene0"
    assert list(full.var["gene_ids"]) == [f"ENSMUSG{g:05d}" for g in range(6)]

    head = read_10x_h5(path, n_cells=4)
    np.testing.assert_array_equal(_dense(head.X), counts[:4])
    assert list(head.obs["cell_index"]) == [0, 1, 2, 3]
    assert read_10x_h5(path, n_cells=100).n_obs == 9
    assert read_10x_h5(path, n_cells=0).n_obs == 0

    pick = [7, 0, 3, 8, 4]
    sub = read_10x_h5(path, genome="mm10", cells=pick, chunk_cells=2)
    np.testing.assert_array_equal(_dense(sub.X), counts[pick])
    assert list(sub.obs_names) == [f"AAAC{c:04d}-1" for c in pick]
    assert list(sub.obs["cell_index"]) == pick

    mask = np.zeros(9, dtype=bool)
    mask[[1, 5, 6]] = True
    masked = read_10x_h5(path, cells=mask)
    np.testing.assert_array_equal(_dense(masked.X), counts[mask])

    with pytest.raises(ValueError, match="either n_cells or cells"):
        read_10x_h5(path, n_cells=2, cells=[0])
    with pytest.raises(ValueError, match="duplicate"):
        read_10x_h5(path, cells=[1, 1])
    with pytest.raises(ValueError, match="out of range"):
        read_10x_h5(path, cells=[9])


def test_read_10x_v3(tmp_path: Path) -> None:
    counts = _planted_counts(5, 4, seed=3)
    path = tmp_path / "filtered_feature_bc_matrix.h5"
    _write_10x_v3(path, counts)

    adata = read_10x_h5(path)
    np.testing.assert_array_equal(_dense(adata.X), counts[:, :3])  # antibody dropped
    assert list(adata.var_names) == ["G0", "G1", "G2"]
    assert set(adata.var["feature_types"]) == {"Gene Expression"}

    everything = read_10x_h5(path, gene_expression_only=False, cells=[4, 1])
    np.testing.assert_array_equal(_dense(everything.X), counts[[4, 1]])
    with pytest.raises(ValueError, match="no features of genome 'mm10'"):
        read_10x_h5(path, genome="mm10")


def test_read_10x_errors(tmp_path: Path) -> None:
    counts = _planted_counts(3, 2)
    two = tmp_path / "two.h5"
    _write_10x_v2(two, counts, genomes=("mm10", "hg19"))
    with pytest.raises(ValueError, match="several genomes"):
        read_10x_h5(two)
    np.testing.assert_array_equal(_dense(read_10x_h5(two, genome="hg19").X), counts)
    with pytest.raises(ValueError, match="genome 'dm6' not found"):
        read_10x_h5(two, genome="dm6")

    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"wrong\.h5: not a 10x Cell Ranger HDF5 file"):
        read_10x_h5(wrong)

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00\x01 not hdf5")
    with pytest.raises(ValueError, match=r"garbage\.h5: not an HDF5 file"):
        read_10x_h5(garbage)

    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        read_10x_h5(tmp_path / "nothing.h5")


# --------------------------------------------------------------------------- gene selection


@pytest.mark.parametrize("sparse", [True, False])
def test_select_top_variance_genes(sparse: bool) -> None:
    rng = np.random.default_rng(4)
    scales = np.array([0.1, 5.0, 1.0, 20.0, 0.5, 3.0])
    counts = rng.poisson(scales, size=(300, 6)).astype(np.float32)
    X = sp.csr_matrix(counts) if sparse else counts
    adata = ad.AnnData(X=X, var=pd.DataFrame(index=[f"g{i}" for i in range(6)]))

    expected = np.argsort(-counts.var(axis=0))[:3]
    mask = select_top_variance_genes(adata, 3, return_mask=True)
    assert mask.dtype == bool and mask.sum() == 3
    assert set(np.flatnonzero(mask)) == set(expected)

    sub = select_top_variance_genes(adata, 3)
    assert list(sub.var_names) == [f"g{i}" for i in sorted(expected)]  # original order
    np.testing.assert_allclose(
        sub.var["count_variance"], counts.var(axis=0)[sorted(expected)], rtol=1e-6
    )
    assert adata.n_vars == 6  # input untouched

    # variances on the first cells only (the BRAIN protocol)
    head_mask = select_top_variance_genes(adata, 2, n_cells=50, return_mask=True)
    assert set(np.flatnonzero(head_mask)) == set(np.argsort(-counts[:50].var(axis=0))[:2])

    with pytest.raises(ValueError, match="n_top must be in"):
        select_top_variance_genes(adata, 7)


# --------------------------------------------------------------------------- dispatch


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata")
def test_read_counts_dispatch_and_errors(tmp_path: Path) -> None:
    counts = _planted_counts(4, len(ZEISEL_GENES))
    txt = tmp_path / "cortex.txt"
    _write_zeisel(txt, counts)
    np.testing.assert_array_equal(_dense(read_counts(txt).X), counts)

    loom = tmp_path / "r.loom"
    _write_loom(loom, counts)
    np.testing.assert_array_equal(_dense(read_counts(loom).X), counts)

    h5 = tmp_path / "b.h5"
    _write_10x_v2(h5, counts)
    np.testing.assert_array_equal(_dense(read_counts(h5, n_cells=2).X), counts[:2])

    h5ad = tmp_path / "c.h5ad"
    ad.AnnData(X=counts.astype(np.float32)).write_h5ad(h5ad)  # dense X
    back = read_counts(h5ad)
    assert sp.isspmatrix_csr(back.X)
    np.testing.assert_array_equal(_dense(back.X), counts)

    with pytest.raises(ValueError, match=r"data\.csv: unknown count file extension '\.csv'"):
        read_counts(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="absent.loom"):
        read_counts(tmp_path / "absent.loom")
    fake = tmp_path / "fake.h5ad"
    fake.write_text("not hdf5")
    with pytest.raises(ValueError, match=r"fake\.h5ad: not an HDF5 file"):
        read_counts(fake)
    empty = tmp_path / "empty.h5ad"
    with h5py.File(empty, "w") as f:
        f["junk"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"empty\.h5ad"):
        read_counts(empty)


# ---- zinbgrad convert: dense / CSC counts on disk rewritten as CSR, in chunks ------------------


def _annotated(X) -> ad.AnnData:
    n, J = X.shape
    a = ad.AnnData(
        X,
        obs=pd.DataFrame(
            {"batch": pd.Categorical(["a", "b"] * (n // 2))}, index=[f"c{i}" for i in range(n)]
        ),
        var=pd.DataFrame(
            {"gene_symbol": [f"S{j}" for j in range(J)]}, index=[f"g{j}" for j in range(J)]
        ),
    )
    a.obsm["X_pca"] = np.arange(2 * n, dtype=float).reshape(n, 2)
    a.uns["note"] = "kept"
    return a


def _counts(seed: int = 0, n: int = 40, J: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.poisson(1.0, (n, J)) * (rng.random((n, J)) < 0.4)).astype(np.float32)


@pytest.mark.parametrize("layout", ["dense", "csc"])
@pytest.mark.parametrize("chunk_entries", [7, 97, 2**24])
def test_convert_to_csr_keeps_counts_and_annotations(tmp_path: Path, layout, chunk_entries) -> None:
    from zinbgrad.data.convert import to_csr

    Y = _counts()
    Y[5] = 0  # an empty row and an empty column
    Y[:, 3] = 0
    a = _annotated(Y if layout == "dense" else sp.csc_matrix(Y))
    a.layers["other"] = sp.csr_matrix(Y * 2)
    src = tmp_path / "in.h5ad"
    a.write_h5ad(src)
    before = src.read_bytes()
    out = to_csr(src, tmp_path / "out.h5ad", chunk_entries=chunk_entries)
    assert src.read_bytes() == before
    with h5py.File(out, "r") as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    b = ad.read_h5ad(out)
    assert sp.isspmatrix_csr(b.X) and b.X.has_sorted_indices
    np.testing.assert_array_equal(b.X.toarray(), Y)
    pd.testing.assert_frame_equal(b.obs, a.obs)
    pd.testing.assert_frame_equal(b.var, a.var)
    np.testing.assert_array_equal(b.obsm["X_pca"], a.obsm["X_pca"])
    np.testing.assert_array_equal(b.layers["other"].toarray(), Y * 2)
    assert b.uns["note"] == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad"]  # no scratch


def test_convert_a_layer_and_stream_a_fit_from_it(tmp_path: Path) -> None:
    from zinbgrad import ZINBWaVE
    from zinbgrad.cli import main

    Y = _counts(1, n=60, J=30)
    Y = Y[Y.sum(1) > 0][:, Y.sum(0) > 0]
    a = _annotated(Y[: Y.shape[0] // 2 * 2])
    a.layers["counts"] = sp.csc_matrix(a.X)
    src, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    a.write_h5ad(src)
    with pytest.raises(ValueError, match=r"zinbgrad convert IN.h5ad OUT.h5ad --layer counts"):
        ZINBWaVE(2, verbose=False).fit(str(src), layer="counts")
    assert main(["convert", str(src), str(out), "--layer", "counts"]) == 0
    with h5py.File(out, "r") as f:
        assert f["layers/counts"].attrs["encoding-type"] == "csr_matrix"
        assert isinstance(f["X"], h5py.Dataset)  # X itself is copied as it was
    streamed = ZINBWaVE(2, verbose=False).fit(str(out), layer="counts")
    in_memory = ZINBWaVE(2, verbose=False).fit(a, layer="counts")
    np.testing.assert_allclose(streamed.W_, in_memory.W_, atol=1e-8)


def test_convert_errors_leave_no_output(tmp_path: Path) -> None:
    from zinbgrad.cli import main
    from zinbgrad.data.convert import to_csr

    src = tmp_path / "in.h5ad"
    _annotated(sp.csr_matrix(_counts())).write_h5ad(src)
    with pytest.raises(ValueError, match="csr_matrix; it can be streamed as it is"):
        to_csr(src, tmp_path / "out.h5ad")
    with pytest.raises(KeyError, match="layers/nope"):
        to_csr(src, tmp_path / "out.h5ad", layer="nope")
    with pytest.raises(SystemExit, match="is the input file"):
        main(["convert", str(src), str(src)])
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    with pytest.raises(SystemExit, match="cannot open"):
        main(["convert", str(tmp_path / "junk.h5ad"), str(tmp_path / "out.h5ad")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "junk.h5ad"]

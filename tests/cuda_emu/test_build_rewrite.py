"""The emulator build's rewrite of __shared__ declarations (tests/cuda_emu/build.py,
rewrite()): pure text, no compiler needed."""

from __future__ import annotations

import pytest

from cuda_emu.build import rewrite


def test_extern_shared_becomes_the_launch_buffer():
    src = "__global__ void k() {\n  extern __shared__ __align__(16) unsigned char smem[];\n}\n"
    out = rewrite(src, "k.cu")
    assert "unsigned char (&smem)[] = ::palfast_emu::dynamic_shared<unsigned char>(16);" in out
    assert "extern" not in out


def test_extern_shared_without_align_and_over_lines_keeps_the_line_count():
    src = "void k() {\n  extern __shared__\n    Pair<int, float> buf[];\n  int after;\n}\n"
    out = rewrite(src, "k.cu")
    assert "Pair<int, float> (&buf)[] = ::palfast_emu::dynamic_shared<Pair<int, float>>(1);" in out
    assert out.count("\n") == src.count("\n")
    assert out.splitlines()[3] == "  int after;"


def test_static_shared_reports_every_array_on_its_line():
    src = "void k() {\n  __shared__ __align__(16) float a[2][N], b[f(1, 2)];\n}\n"
    line = rewrite(src, "k.cu").splitlines()[1]
    assert line.startswith("  __shared__ __align__(16) float a[2][N], b[f(1, 2)];")
    assert "note_static_shared(&a, sizeof(a));" in line
    assert "note_static_shared(&b, sizeof(b));" in line


def test_comments_strings_and_directives_are_left_alone():
    src = (
        "// extern __shared__ float c[];\n"
        "/* __shared__ int d[4]; */\n"
        "#define SHARED __shared__ int e[4];\n"
        'const char* s = "__shared__ int f[4];";\n'
    )
    assert rewrite(src, "k.cu") == src


def test_an_unsupported_extern_declaration_is_a_build_error():
    with pytest.raises(RuntimeError, match=r"k\.cu:2: cannot emulate this extern __shared__ declaration"):
        rewrite("void k() {\n  extern __shared__ float c[16];\n}\n", "k.cu")

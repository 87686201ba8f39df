"""metrics/ptb_tokenizer.py reproduces pycocoevalcap's Java PTBTokenizer (Stanford CoreNLP 3.4.1).

The main test runs the jar that pycocoevalcap ships (through pycocoevalcap itself) once on ~700
varied captions and requires identical output for every one. The tables that
metrics/ptb_lexer_tables.py reads from that jar in Python are compared with those the JVM builds
when it loads the class (reflection). These two need `java`; without it they are skipped with that
reason. The other tests use hand-checked outputs, hand-built class files and jars, and need no Java.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from metrics import ptb_lexer_tables
from metrics.ptb_tokenizer import PUNCTUATIONS, _java_lower, ptb_tokenize

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="`java` is not installed: cannot run pycocoevalcap's PTBTokenizer jar")

HANDWRITTEN = [
    # COCO-like
    "A man riding a wave on top of a surfboard.", "A giraffe standing next to a tree in a field",
    "Two dogs playing with a frisbee on the grass .", "a close up of a plate of food with broccoli",
    "An elephant walking through a river in the jungle.", "A kitchen with a stove, a sink and a fridge.",
    "There is a bus that is parked on the street.", "  Leading and trailing spaces   ", "",
    "A bathroom with a toilet and a sink. ", "A woman holding an umbrella in the rain!", "Is this a cat?",
    # quotes
    'A sign that says "STOP" in red letters.', "A man's hat and the dogs' bowls.", "'Tis the season",
    '"Quoted" at the start', "It's a 'special' day.", "He said ``hello'' to me", "‘curly single’ and “curly double”",
    "«guillemets» and „low quotes“", "rock 'n' roll", "y'all come back", "o'clock", "the '90s and the '80s",
    "Don't, won't, can't, shouldn't, isn't.", "I'm, you're, we've, they'll, she'd.", "ma'am's cat", "cont'd",
    # hyphens and dashes
    "A well-known self-driving car.", "x-ray of a 10-year-old", "A - B -- C --- D ---- E ----- F",
    "en–dash and em—dash", "pre- and post-war", "anti-aircraft pro-choice", "a non-U.S. flag", "e-mail",
    "A soft\u00adhyphen in a word", "\u00ad", "co-ed and re-enter", "up_to_date snake_case",
    # numbers and money
    "3.5 inches", "1,000,000 people", "$5 and $3.50 and US$10", "£20 and €10 and ¥500 and 5¢", "50% off",
    "1/2 cup and 3/4 mile", "½ and ¼ and ¾ and ⅓ and ⅔ and ⅕", "2 1/2 hours", "The 1980s", "9/11",
    "12/25/2020 is Christmas", "Call 555-1234 or (555) 123-4567", "+1 650 555 1234", "-5 degrees and +3",
    "10:30 am", "3rd place and 21st century", "No. 5 and no. 7", "ca. 1900", "pp. 12-15", "fig. 3",
    "4x4 truck", "3D glasses", "a 2-by-4", "#1 fan", "the number 10.", "A score of 3-2.", "1.5.3 version",
    # abbreviations and acronyms
    "The U.S. flag is red.", "Mr. Smith and Mrs. Jones met Dr. Who.", "St. Louis, Mo. is a city.",
    "Apple Inc. and Co. Ltd.", "The U.S. He said so.", "a.m. and p.m.", "e.g. and i.e. etc.", "vs. and vs",
    "Jan. 5 and Sept. 10", "Ph.D. student", "U.S.A. and U.K.", "A. Lincoln", "I. M. Pei", "the letter a.",
    "Washington D.C.", "Gen. Patton", "Mt. Fuji", "Prof. X", "Calif. and Mass.", "a.k.a. Bob",
    "pty. ltd", "Corp. Inc.", "There is a U.S.", "Inc.", "etc.", "Mr.", "I.", "the letter I",
    # trailing punctuation
    "A dog.", "A dog..", "A dog...", "A dog....", "Wait . . . what", "A dog!", "A dog?!", "A dog;",
    "A dog:", "A dog,", "Hmm…", "end with ellipsis...", "dots...in the middle", "??!!", "..",
    # parentheses and brackets
    "A cat (black) on a mat.", "[a bracket] and {a brace}", "(nested (parens))", "<b>bold</b> text",
    "a < b > c", "<<double>>", "x=y+z", "f(x)", "a * b ** c", "a / b // c", "a \\ b", "100% | 50%",
    # urls, emails, twitter
    "Visit http://www.example.com/path?x=1&y=2 now", "see www.coco.org.", "https://a.b/c.", "foo.com and bar.net",
    "mail me at user@example.com!", "@user and #hashtag", "file.txt and photo.jpg", "C++ and C# and F#",
    "AT&T and R&D and S&P-500", "A &amp; B &quot;x&quot;", "&lt;tag&gt;", "Tom&Jerry",
    # assimilations
    "I cannot believe it", "gonna gotta wanna lemme gimme", "Gonna go", "cannot.", "CANNOT",
    # unicode
    "A café with naïve résumés", "Zürich São Paulo", "Ελληνικά ΟΔΟΣ ΣΟΦΙΑΣ", "русский текст", "中文 日本語 한국어",
    "עברית and العربية", "हिन्दी", "emoji 😀 🐶 dog", "math ∀x ∈ ℝ", "fi ligature ﬁ and ß", "İstanbul",
    "non\u00a0breaking\u2009thin", "zero\u200bwidth\ufeff", "tab\there", "°C and 5° and ×2",
    "™ and © and ®", "• bullet · dot", "\x7f delete", "ＦＵＬＬＷＩＤＴＨ", "Ⅻ roman", "ǅ titlecase",
    # smileys and misc
    ":) :-( ;) :D", "^_^ and (^_^)", "<3 love", "A b c d e f g", "ALL CAPS CAPTION.", "MiXeD CaSe",
]

# sentences that end with an acronym: the next caption's first word changes their tokens (as in Java)
CONTEXT = ["A photo of the letter a.", "A man on a bike.", "the letter b.", "a man on a bike.",
           "Made in the U.S.", "The end.", "Sign for I.", "It is big."]


def _generated(seed: int, count: int) -> list[str]:
    """Random captions mixing words, abbreviations, numbers, quotes and punctuation."""
    rng = random.Random(seed)
    pieces = ("a an the man woman dog cat bus U.S. Mr. Dr. St. etc. Inc. co. a.m. cannot gonna isn't "
              "don't it's '90s 3.5 1,000 $5 £20 ½ 3-4 555-1234 www.x.org x@y.com #tag C++ AT&T -- ... "
              ". , ; : ! ? \" ' ` ( ) [ ] { } <b> * / café ΟΔΟΣ 😀 A. I. The He It well-known 10-year-old "
              "1/2 9/11 pp. fig. :) ^_^ \u00a0 \u00ad").split(" ")
    glue = [" "] * 8 + ["", "  ", "\t", ".", ",", "'", '"', "-", "(", ")", "'s", "n't"]
    out = []
    for _ in range(count):
        words = [rng.choice(pieces) for _ in range(rng.randint(0, 14))]
        words = [w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.15 else w for w in words]
        text = "".join(w + rng.choice(glue) for w in words).rstrip()
        out.append(text + rng.choice(["", ".", " .", "!", "?", "..."]))
    return out


def _random_unicode(seed: int, count: int) -> list[str]:
    """Random code points (BMP and astral); no line terminators, no lone surrogates."""
    rng = random.Random(seed)
    line_breaks = set("\n\r\x0b\x0c\x85\u2028\u2029")

    def char() -> str:
        while True:
            r = rng.random()
            c = chr(rng.randint(0x20, 0x7E) if r < 0.5 else rng.randint(0x80, 0x3000) if r < 0.8
                    else rng.randint(0x3000, 0xFFFF) if r < 0.95 else rng.randint(0x10000, 0x10FFFF))
            if c not in line_breaks and not 0xD800 <= ord(c) <= 0xDFFF:
                return c

    return ["".join(char() for _ in range(rng.randint(0, 20))) for _ in range(count)]


def _java_ptb(captions: list[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (the Java jar), one caption per image id."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokens = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [tokens[i][0] for i in range(len(captions))]


@needs_java
def test_matches_java_ptbtokenizer_on_varied_captions():
    captions = HANDWRITTEN + CONTEXT + _generated(0, 350) + _random_unicode(1, 200)
    ours, java = ptb_tokenize(captions), _java_ptb(captions)
    mismatches = [(c, o, j) for c, o, j in zip(captions, ours, java) if o != j]
    assert len(java) == len(captions) and not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]}"
    assert sum(bool(t) for t in ours) > 600  # not trivially empty


def test_known_outputs():
    cases = {
        "A man's bike -- isn't it red?": "a man 's bike is n't it red",
        "Two dogs... on the grass.": "two dogs on the grass",
        "A cat (black) on a mat.": "a cat -lrb- black -rrb- on a mat",  # lower-cased, so not removed
        "I cannot believe it, gonna go!": "i can not believe it gon na go",
        "The U.S. flag, Mr. Smith and a.m.": "the u.s. flag mr. smith and a.m.",
        'A sign that says "STOP".': "a sign that says stop",
        "$3.50 and £20 and ½": "$ 3.50 and # 20 and 1/2",
        "Call (555) 123-4567 now": "call -lrb-555-rrb-\u00a0123-4567 now",
        "Visit http://www.example.com/a?b=c today": "visit http://www.example.com/a?b=c today",
        "A well-known 10-year-old": "a well-known 10-year-old",
        "Ελληνικά ΟΔΟΣ": "ελληνικά οδος",
        "emoji 😀 dog": "emoji dog",  # untokenizable characters are deleted, as in Java
        "": "",
    }
    assert ptb_tokenize(list(cases)) == list(cases.values())


def test_acronym_before_a_capitalised_next_line_as_java():
    # "a." is one token, except when the next line starts with "A " (PTBLexer's ACRONYM rule)
    assert ptb_tokenize(["the letter a.", "A man."]) == ["the letter a", "a man"]
    assert ptb_tokenize(["the letter a.", "a man."]) == ["the letter a.", "a man"]
    assert ptb_tokenize(["the letter a."]) == ["the letter a."]


def test_line_breaks_inside_a_caption_stay_in_that_caption():
    # pycocoevalcap replaces only "\n"; the jar also breaks lines at \r, \x0b, \x0c, \x85, \u2028,
    # \u2029, which shifts every later caption to the wrong image. Here they separate tokens only.
    assert ptb_tokenize(["a dog\rruns", "two\u2028cats\r\n", "a\nbird"]) == ["a dog runs", "two cats", "a bird"]


def test_punctuation_list_is_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS as THEIRS

    assert PUNCTUATIONS == set(THEIRS)


def test_java_lowercasing_of_final_sigma():
    # String.toLowerCase(Locale.ENGLISH) decides the final sigma with Java's word BreakIterator;
    # these outputs were checked against Java 17.
    cases = {"ΟΔΟΣ": "οδος", "ΣΑΣ": "σας", "Σ": "σ", "ΑΣ1": "ας1", "ΑΣ1Β": "ασ1β", "ΑΣ\u00adΒ": "ασ\u00adβ",
             "ΑΣ'": "ας'", "1ΑΣ:Σ": "1ας:σ", "ΑΣ\u0301": "ας\u0301", "ΑΣ_Β": "ασ_β", "Σ\u12ecj": "σ\u12ecj",
             "ΑΣ-": "ας-", "ΑΣ.Β": "ασ.β"}
    assert "ΑΣ1Β".lower() != cases["ΑΣ1Β"]  # where Python's own rule differs
    assert {k: _java_lower(k) for k in cases} == cases


DUMP_TABLES_JAVA = """
import java.io.*; import java.lang.reflect.Field;
public class DumpTables { public static void main(String[] a) throws Exception {
  Class<?> c = Class.forName("edu.stanford.nlp.process.PTBLexer");
  for (String name : new String[]{"ZZ_CMAP", "ZZ_ACTION", "ZZ_ROWMAP", "ZZ_ATTRIBUTE", "ZZ_TRANS"}) {
    Field f = c.getDeclaredField(name); f.setAccessible(true); Object v = f.get(null);
    DataOutputStream out = new DataOutputStream(new BufferedOutputStream(new FileOutputStream(new File(a[0], name))));
    int n = java.lang.reflect.Array.getLength(v);
    for (int i = 0; i < n; i++) out.writeInt(v instanceof char[] ? ((char[]) v)[i] : ((int[]) v)[i]);
    out.close(); } } }
"""


@needs_java
def test_tables_parsed_in_python_equal_the_jvms(tmp_path):
    """The tables read from the jar without Java are those the JVM builds when it loads PTBLexer."""
    jar = ptb_lexer_tables.find_jar()
    source = tmp_path / "DumpTables.java"
    source.write_text(DUMP_TABLES_JAVA)
    run = subprocess.run([JAVA, "-cp", str(jar), str(source), str(tmp_path)], capture_output=True, text=True)
    if run.returncode != 0 and "compiler" in run.stderr.lower():  # a JRE without the source launcher
        pytest.skip(f"this Java cannot run a source file: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stderr
    ours = ptb_lexer_tables.read_tables(jar, check=False)
    for name, ours_values in zip(["ZZ_CMAP", "ZZ_ACTION", "ZZ_ROWMAP", "ZZ_TRANS", "ZZ_ATTRIBUTE"], ours):
        jvm = np.fromfile(tmp_path / name, dtype=">i4").astype(np.int64)
        assert np.array_equal(ours_values, jvm), name
    assert ptb_lexer_tables.tables_sha256(ours) == ptb_lexer_tables.SHA256


def test_tables_come_from_the_installed_pycocoevalcap():
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = ptb_lexer_tables.find_jar()
    assert jar.name == ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR == ptb_lexer_tables.JAR_NAME
    assert jar.resolve() == (Path(ptbtokenizer.__file__).parent / jar.name).resolve()
    tables = ptb_lexer_tables.load_tables()
    assert ptb_lexer_tables.load_tables() is tables  # read once per process
    assert ptb_lexer_tables.tables_sha256(tables) == ptb_lexer_tables.SHA256
    assert (tables.n_classes, tables.n_states, len(tables.trans)) == (125, 4058, 125 * 3778)
    assert tables.trans.min() == -1 and set(np.unique(tables.attribute).tolist()) <= {0, 1, 8, 9}
    # the scanner's own shortcuts: "\n" from the start state is a complete match that emits nothing
    newline_state = tables.trans[tables.rowmap[2] + tables.cmap[ord("\n")]]
    assert tables.attribute[newline_state] == 9


def _modified_utf8(text: str) -> bytes:
    """Java's class-file string encoding: UTF-8 of each UTF-16 code unit, with NUL as C0 80."""
    units = text.encode("utf-16-le", "surrogatepass")
    per_unit = "".join(chr(u) for u in struct.unpack(f"<{len(units) // 2}H", units))
    return per_unit.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


def _tampered_jar(tmp_path: Path, change) -> Path:
    """A copy of the jar with PTBLexer.class replaced by change(class bytes)."""
    with zipfile.ZipFile(ptb_lexer_tables.find_jar()) as jar:
        data = jar.read(ptb_lexer_tables.LEXER_CLASS)
    path = tmp_path / "other.jar"
    with zipfile.ZipFile(path, "w") as jar:
        if change is not None:
            jar.writestr(ptb_lexer_tables.LEXER_CLASS, change(data))
    return path


def test_other_jars_are_refused_with_a_clear_error(tmp_path):
    def one_attribute_changed(data: bytes) -> bytes:
        packed = ptb_lexer_tables.class_string_constants(data)["ZZ_ATTRIBUTE_PACKED_0"]
        i = next(i for i in range(1, len(packed), 2) if packed[i] == "\x01")  # a run of accepting states
        changed = packed[:i] + "\x09" + packed[i + 1:]  # ... now also without outgoing transitions
        assert data.count(_modified_utf8(packed)) == 1
        return data.replace(_modified_utf8(packed), _modified_utf8(changed))

    assert ptb_lexer_tables.read_tables(_tampered_jar(tmp_path, lambda d: d)) is not None  # an unchanged copy is fine
    jar = _tampered_jar(tmp_path, one_attribute_changed)
    assert not np.array_equal(ptb_lexer_tables.read_tables(jar, check=False).attribute,
                              ptb_lexer_tables.load_tables().attribute)
    with pytest.raises(RuntimeError, match="other.jar does not contain the expected PTB lexer.*pycocoevalcap==1.2"):
        ptb_lexer_tables.read_tables(jar)
    with pytest.raises(RuntimeError, match="cannot read the PTB lexer tables from .*other.jar.*pycocoevalcap==1.2"):
        ptb_lexer_tables.read_tables(_tampered_jar(tmp_path, None))  # no PTBLexer.class
    with pytest.raises(FileNotFoundError, match="missing.jar: no such file; pycocoevalcap==1.2 ships"):
        ptb_lexer_tables.read_tables(tmp_path / "missing.jar")


def test_missing_pycocoevalcap_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycocoevalcap" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pycocoevalcap is not installed.*pip install pycocoevalcap==1.2"):
        ptb_lexer_tables.find_jar()


def _class_file(fields: list[tuple[str, str, object]]) -> bytes:
    """A minimal class file (JVM spec, chapter 4) with static final fields (name, descriptor, value)."""
    pool: list[bytes] = []

    def add(entry: bytes, slots: int = 1) -> int:  # -> its (1-based) index; Long/Double take two slots
        pool.append(entry)
        index = len(pool)
        pool.extend([b""] * (slots - 1))
        return index

    def utf8(text: str) -> int:
        raw = _modified_utf8(text)
        return add(b"\x01" + struct.pack(">H", len(raw)) + raw)

    this = add(b"\x07" + struct.pack(">H", utf8("Example")))
    add(b"\x03" + struct.pack(">i", 7))  # an Integer, a Long (two slots), a method handle: skipped correctly
    add(b"\x05" + struct.pack(">q", 2**40), slots=2)
    add(b"\x0f\x06" + struct.pack(">H", 1))
    constant_value = utf8("ConstantValue")
    body = b""
    for name, descriptor, value in fields:
        if isinstance(value, str):
            index = add(b"\x08" + struct.pack(">H", utf8(value)))
        else:
            index = add(b"\x05" + struct.pack(">q", value), slots=2)
        body += struct.pack(">HHHH", 0x1A, utf8(name), utf8(descriptor), 1)
        body += struct.pack(">HIH", constant_value, 2, index)
    header = b"\xca\xfe\xba\xbe" + struct.pack(">HHH", 0, 52, len(pool) + 1) + b"".join(pool)
    return header + struct.pack(">HHHH", 0x21, this, 0, 0) + struct.pack(">H", len(fields)) + body + b"\x00\x00\x00\x00"


def test_class_file_constants_and_jflex_unpacking():
    text = "a\x00b\u00e9\u4e2d\U0001f600\uffff"
    string = "Ljava/lang/String;"
    data = _class_file([("ZZ_LONG", "J", 5), ("ZZ_TEXT", string, text), ("ZZ_EMPTY", string, "")])
    constants = ptb_lexer_tables.class_string_constants(data)
    # strings come back as UTF-16 code units, as Java's charAt sees them
    assert constants == {"ZZ_TEXT": "a\x00b\u00e9\u4e2d\ud83d\ude00\uffff", "ZZ_EMPTY": ""}
    with pytest.raises(ValueError, match="invalid modified UTF-8"):  # a 4-byte UTF-8 sequence
        ptb_lexer_tables._modified_utf8("\U0001f600".encode())
    with pytest.raises(ValueError, match="not a Java class file"):
        ptb_lexer_tables.class_string_constants(b"PK\x03\x04")
    # JFlex packing: (count, value) pairs; transitions stored plus one; the row map as (high, low) halves
    assert ptb_lexer_tables._run_lengths("\x03\x05\x01\x00\x02\uffff").tolist() == [5, 5, 5, 0, 0xFFFF, 0xFFFF]
    assert ptb_lexer_tables._run_lengths("\x02\x00\x01\x03", offset=-1).tolist() == [-1, -1, 2]
    assert ptb_lexer_tables._int_pairs("\x00\x7d\x01\x02").tolist() == [125, 65536 + 2]
    # a table split over numbered constants is unpacked part after part
    assert ptb_lexer_tables._run_lengths("\x00\x04").tolist() == [4]  # a count of 0 still writes once
    parts = {"ZZ_CMAP_PACKED": "\uffff\x00\x01\x01",  # 65535 code units of class 0, then one of class 1
             "ZZ_ACTION_PACKED_0": "\x01\x00", "ZZ_ACTION_PACKED_1": "\x01\x07",
             "ZZ_ROWMAP_PACKED_0": "\x00\x00\x00\x02", "ZZ_ATTRIBUTE_PACKED_0": "\x02\x01",
             "ZZ_TRANS_PACKED_1": "\x02\x02", "ZZ_TRANS_PACKED_0": "\x02\x00"}
    tables = ptb_lexer_tables._unpack(parts, "test")
    assert tables.action.tolist() == [0, 7] and tables.rowmap.tolist() == [0, 2]
    assert tables.trans.tolist() == [-1, -1, 1, 1] and tables.n_classes == 2 and tables.cmap[-1] == 1
    del parts["ZZ_TRANS_PACKED_0"]
    with pytest.raises(ValueError, match="ZZ_TRANS_PACKED\\* is missing or incomplete"):
        ptb_lexer_tables._unpack(parts, "test")

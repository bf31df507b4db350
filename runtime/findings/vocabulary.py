"""The fixed vocabulary of ECG statements: what each is called, its standard codes, how text says it.

Codes, and where they come from:
- `snomed`: SNOMED CT concept ids as the PhysioNet/Computing in Cardiology Challenge 2021 label tables
  give them (physionetchallenges/evaluation-2021: dx_mapping_scored.csv, dx_mapping_unscored.csv; the
  table CPSC 2018, PTB-XL, Georgia, Chapman-Shaoxing and Ningbo were mapped to), except "Electrocardiogram
  normal" 164854000 and "Electrocardiogram abnormal" 102594003 (SNOMED CT International Edition findings)
  and "Conduction disorder of the heart" 44808001. None where SNOMED CT has no concept for the statement
  (PTB-XL's superclass HYP, "hypertrophy" of atria or ventricles, is its own code).
- `scp`: the SCP-ECG statement acronyms of PTB-XL's scp_statements.csv (PTB-XL 1.0, PhysioNet), the codes
  PTB-XL labels and ECGBench's PTB-XL questions are built from.
- `labels`: the statement's label in each of ECGBench's label spaces (below), the way a cardiologist's
  reading maps onto them: a left bundle branch block is CPSC's LBBB, CODE-15's LBBB and PTB-XL's CD.

`phrases` are case-insensitive regular expressions (whole words); `codes` are case-sensitive whole-word
tokens (regular expressions too, most of them plain words), as the ECGBench scorer reads label codes
(benchmarks/ecgbench/parse.py): "AF" is a code, "af" in "leaf" or "after" is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pulse_edge.errors import ConfigError

# ECGBench's label spaces (calibration/datasets/ecgbench/subsets.py names the subsets that use them).
PTBXL_SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
CPSC2018_CLASSES = ("NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE")
CODE15_CLASSES = ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")
CODE15_WHOLE = ("NORM", "ABNORMAL")  # CODE-15% answers may be exactly one of these words
LABEL_SPACES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "ptbxl": PTBXL_SUPERCLASSES,
    "cpsc2018": CPSC2018_CLASSES,
    "code15": CODE15_WHOLE + CODE15_CLASSES,
})
CATEGORIES = ("global", "rhythm", "conduction", "ectopy", "ischemia", "infarction", "hypertrophy", "axis", "waves")

# "ST" is CODE-15's code for sinus tachycardia and also the ST segment ("ST elevation", "ST in V1-V3 is elevated",
# "PR, QRS, ST, T normal", "ST: isoelectric"): the code only where it stands alone, at the end of the text, a
# sentence or a list item, and never before "T" ("ST, T wave changes", "ST and T") nor as a field's label.
_ST_ALONE = r"(?=[ \t]*(?:$|[.;)\]\n]|:[ \t]*$|,(?![ \t]*T\b)|[ \t]+(?:and|or|&)[ \t]+(?!T\b)))"
_BEATS = r"(?:contractions?|complex(?:es)?|beats?|depolari[sz]ations?)"
_AV = r"(?:av|a-v|atrioventricular|heart)"


@dataclass(frozen=True)
class Concept:
    """One ECG statement of the vocabulary."""

    key: str  # the finding's code in pulse-edge's JSON (the SCP-ECG acronym where there is one)
    name: str
    category: str
    snomed: str | None
    scp: str | None
    phrases: tuple[str, ...]
    codes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)  # label space -> label

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ConfigError(f"concept {self.key}: category {self.category!r} is not one of {CATEGORIES}")
        for space, label in self.labels.items():
            if label not in LABEL_SPACES.get(space, ()):
                raise ConfigError(f"concept {self.key}: {label!r} is not a label of space {space!r}")


def _c(key: str, name: str, category: str, snomed: str | None, scp: str | None, phrases: tuple[str, ...],
       codes: tuple[str, ...] = (), **labels: str) -> Concept:
    return Concept(key, name, category, snomed, scp, phrases, codes, MappingProxyType(labels))


CONCEPTS: tuple[Concept, ...] = (
    # --- the whole ECG -------------------------------------------------------------------------------
    _c("NORM", "normal ECG", "global", "164854000", "NORM",
       (r"(?<!otherwise )(?<!otherwise a )normal (?:12[- ]lead )?(?:ecg|ekg|electrocardiogram)",
        r"(?:ecg|ekg|electrocardiogram) (?:is )?within normal limits"), ("NORM",),
       ptbxl="NORM", cpsc2018="NORM", code15="NORM"),
    _c("ABNORMAL", "abnormal ECG", "global", "102594003", None,
       (r"abnormal (?:12[- ]lead )?(?:ecg|ekg|electrocardiogram)",), ("ABNORMAL",), code15="ABNORMAL"),
    # --- rhythm ----------------------------------------------------------------------------------------
    _c("SR", "sinus rhythm", "rhythm", "426783006", "SR", (r"(?:normal )?sinus rhythm",), ("SR", "NSR", "SNR")),
    _c("STACH", "sinus tachycardia", "rhythm", "427084000", "STACH", (r"sinus tach(?:ycardia)?",),
       ("STACH", "STach", "ST" + _ST_ALONE), code15="ST"),
    _c("SBRAD", "sinus bradycardia", "rhythm", "426177001", "SBRAD", (r"sinus brady(?:cardia)?",), ("SBRAD", "SB"),
       code15="SB"),
    _c("SARRH", "sinus arrhythmia", "rhythm", "427393009", "SARRH", (r"sinus arrhythmia",), ("SARRH",)),
    _c("AFIB", "atrial fibrillation", "rhythm", "164889003", "AFIB",
       (r"atrial fib(?:rillation)?", r"a\.?[- ]?fib"), ("AFIB", "AF"), cpsc2018="AF", code15="AF"),
    _c("AFLT", "atrial flutter", "rhythm", "164890007", "AFLT", (r"atrial flutter", r"a\.?-?flutter"),
       ("AFLT", "AFL")),
    _c("SVTAC", "supraventricular tachycardia", "rhythm", "426761007", "SVTAC",
       (r"supraventricular tachycardia",), ("SVTAC", "SVT")),
    _c("PSVT", "paroxysmal supraventricular tachycardia", "rhythm", "67198005", "PSVT",
       (r"paroxysmal supraventricular tachycardia",), ("PSVT",)),
    _c("ATACH", "atrial tachycardia", "rhythm", "713422000", None, (r"(?:ectopic )?atrial tachycardia",),
       ("ATach",)),
    _c("JUNCT", "junctional rhythm", "rhythm", "29320008", None,
       (r"(?:atrioventricular |av )?(?:nodal|junctional) (?:escape )?rhythm",)),
    _c("VTACH", "ventricular tachycardia", "rhythm", "164895002", None, (r"ventricular tachycardia",),
       ("VT", "VTach")),
    _c("VFIB", "ventricular fibrillation", "rhythm", "164896001", None, (r"ventricular fibrillation",), ("VF",)),
    _c("PACE", "paced rhythm", "rhythm", "10370003", "PACE",
       (r"(?:atrial(?:ly)?|ventricular(?:ly)?|a-?v|dual[- ]chamber) paced rhythm", r"pac(?:ed|ing|emaker) rhythm",
        r"(?:artificial|electronic) pacemaker", r"(?:atrial|ventricular|a-?v|av sequential|dual[- ]chamber) pacing"),
       ("PACE",)),
    _c("BIGU", "bigeminy", "rhythm", None, "BIGU", (r"(?:ventricular |atrial )?bigemin(?:y|al(?: pattern)?)",),
       ("BIGU",)),
    _c("TRIGU", "trigeminy", "rhythm", None, "TRIGU", (r"(?:ventricular |atrial )?trigemin(?:y|al(?: pattern)?)",),
       ("TRIGU",)),
    # --- conduction ------------------------------------------------------------------------------------
    _c("1AVB", "first-degree AV block", "conduction", "270492004", "1AVB",
       (rf"(?:first|1st|1\u00b0|I\u00b0)[- ]?(?:degree )?{_AV} (?:block|conduction delay)",
        rf"(?:first|1st)[- ]degree {_AV}b", r"(?:first|1st)[- ]degree block", r"(?:1|i)\u00b0 avb",
        rf"{_AV} block (?:1|i)\u00b0",
        rf"{_AV} block,? (?:of )?first[- ]degree"), ("1AVB", "I-AVB", "1dAVb", "IAVB"),
       ptbxl="CD", cpsc2018="I-AVB", code15="1dAVb"),
    _c("2AVB", "second-degree AV block", "conduction", "195042002", "2AVB",
       (rf"(?:second|2nd)[- ]degree (?:{_AV} )?block", r"mobitz(?: type)? (?:i{1,2}|1|2)", r"wenckebach"),
       ("2AVB", "IIAVB"), ptbxl="CD"),
    _c("3AVB", "third-degree AV block", "conduction", "27885002", "3AVB",
       (rf"(?:third|3rd)[- ]degree (?:{_AV} )?block", rf"complete {_AV} block"), ("3AVB", "CHB"), ptbxl="CD"),
    _c("LBBB", "left bundle branch block", "conduction", "164909002", "CLBBB",
       (r"(?:complete )?left bundle[- ]branch block", r"left bbb"), ("LBBB", "CLBBB"),
       ptbxl="CD", cpsc2018="LBBB", code15="LBBB"),
    _c("ILBBB", "incomplete left bundle branch block", "conduction", "251120003", "ILBBB",
       (r"(?:incomplete|partial) left (?:bundle[- ]branch block|bbb)", r"incomplete LBBB",
        r"(?:left bundle[- ]branch block|left bbb|lbbb),? incomplete(?: type)?"), ("ILBBB",), ptbxl="CD"),
    _c("RBBB", "right bundle branch block", "conduction", "59118001", "CRBBB",
       (r"(?:complete )?right bundle[- ]branch block", r"right bbb"), ("RBBB", "CRBBB"),
       ptbxl="CD", cpsc2018="RBBB", code15="RBBB"),
    _c("IRBBB", "incomplete right bundle branch block", "conduction", "713426002", "IRBBB",
       (r"(?:incomplete|partial) right (?:bundle[- ]branch block|bbb)", r"incomplete RBBB",
        r"(?:right bundle[- ]branch block|right bbb|rbbb),? incomplete(?: type)?"), ("IRBBB",), ptbxl="CD"),
    _c("BBB", "bundle branch block", "conduction", "6374002", None, (r"bundle[- ]branch block",), ("BBB",),
       ptbxl="CD"),
    _c("LAFB", "left anterior fascicular block", "conduction", "445118002", "LAFB",
       (r"left anterior (?:fascicular block|hemi-?block)",), ("LAFB", "LAnFB", "LAHB"), ptbxl="CD"),
    _c("LPFB", "left posterior fascicular block", "conduction", "445211001", "LPFB",
       (r"left posterior (?:fascicular block|hemi-?block)",), ("LPFB", "LPHB"), ptbxl="CD"),
    _c("IVCD", "intraventricular conduction delay", "conduction", "698252002", "IVCD",
       (r"(?:non-?specific )?intraventricular conduction (?:delay|disturbance|defect|disorder|block)",),
       ("IVCD", "NSIVCB"), ptbxl="CD"),
    _c("WPW", "Wolff-Parkinson-White pattern", "conduction", "74390002", "WPW",
       (r"wolff[- ]parkinson[- ]white(?: pattern| syndrome)?", r"(?:ventricular )?pre-?excitation"), ("WPW",),
       ptbxl="CD"),
    _c("CD", "conduction disturbance", "conduction", "44808001", None,
       (r"conduction (?:disturbance|disorder|abnormality|defect)",), ("CD",), ptbxl="CD"),
    _c("LPR", "prolonged PR interval", "conduction", "164947007", "LPR",
       (r"(?:prolonged|long) pr(?: interval)?", r"pr(?: interval)? prolongation",
        r"pr(?: interval)? (?:is )?prolonged"), ("LPR",)),
    # --- ectopic beats ---------------------------------------------------------------------------------
    _c("PAC", "premature atrial contraction", "ectopy", "284470004", "PAC",
       (rf"premature atrial {_BEATS}", rf"atrial premature {_BEATS}", rf"supraventricular premature {_BEATS}",
        rf"premature supraventricular {_BEATS}", r"atrial extrasystoles?"), ("PAC", "PACs", "APC", "SVPB"),
       cpsc2018="PAC"),
    _c("PVC", "premature ventricular contraction", "ectopy", "427172004", "PVC",
       (rf"premature ventricular {_BEATS}", rf"ventricular premature {_BEATS}", rf"ventricular ectopic {_BEATS}",
        r"ventricular ectopy", r"ventricular extrasystoles?"), ("PVC", "PVCs", "VPB", "VPC", "VEB"),
       cpsc2018="PVC"),
    # --- ST segment and T wave -------------------------------------------------------------------------
    # ST depression/elevation and T inversion are PTB-XL form statements (STD_, STE_, INVT) with no
    # diagnostic superclass; only the diagnostic ST/T statements project onto PTB-XL's STTC.
    _c("STTC", "ST/T change", "ischemia", "55930002", "NST_",
       (r"(?:non-?specific )?st[- /]?t(?:[- ]wave)? (?:changes?|abnormalit(?:y|ies))",
        r"(?:non-?specific )?st(?:[- ]segment)? (?:and|/) t[- ]wave (?:changes?|abnormalit(?:y|ies))",
        r"(?:non-?specific )?st(?:[- ]segment)? changes?"), ("STTC", "NST_", "NSSTTA"), ptbxl="STTC"),
    _c("STD", "ST depression", "ischemia", "429622005", "STD_",
       (r"st[- ](?:segment )?depressions?", r"depressed st(?:[- ]segments?)?", r"st[- ](?:segments? )?depressed"),
       ("STD", "STD_"), cpsc2018="STD"),
    _c("STE", "ST elevation", "ischemia", "164931005", "STE_",
       (r"st[- ](?:segment )?elevations?", r"elevated st(?:[- ]segments?)?",
        r"st[- ](?:segments? )?elevated"), ("STE", "STE_"), cpsc2018="STE"),
    _c("TAB", "T-wave abnormality", "waves", "164934002", "NDT",
       (r"(?:non-?specific )?t[- ]wave (?:abnormalit(?:y|ies)|changes?)", r"abnormal t[- ]waves?"), ("NDT", "TAb"),
       ptbxl="STTC"),
    _c("TINV", "T-wave inversion", "waves", "59931005", "INVT",
       (r"t[- ]wave inversions?", r"inverted t[- ]waves?", r"t[- ]waves? (?:are )?inverted"), ("INVT", "TInv", "TWI")),
    _c("ISC", "myocardial ischemia", "ischemia", "164861001", "ISC_",
       # not "ischemic cardiomyopathy" or "ischemic heart disease": a patient's history, not this tracing
       (r"(?:myocardial |subendocardial )?isch(?:a)?emi(?:a|c)(?! (?:cardiomyopathy|heart disease))"
        r"(?: changes?| st[- ]t changes?)?",),
       # PTB-XL's ischemia statements by region (diagnostic class STTC): ISC_ and ISCAL, ISCAS, ISCIN, ...
       ("ISC_", "ISCAL", "ISCAS", "ISCIN", "ISCIL", "ISCLA", "ISCAN"), ptbxl="STTC"),
    _c("LNGQT", "prolonged QT interval", "waves", "111975006", "LNGQT",
       (r"(?:prolonged|long) qtc?(?: interval)?", r"qtc?(?: interval)? prolongation",
        r"qtc?(?: interval)? (?:is )?prolonged"), ("LNGQT", "LQT"),
       ptbxl="STTC"),
    # --- infarction ------------------------------------------------------------------------------------
    _c("MI", "myocardial infarction", "infarction", "164865005", None,
       (r"(?:(?:acute|old|prior|recent|previous|evolving|age[- ]undetermined|anterior|anteroseptal|septal"
        r"|lateral|anterolateral|inferior|inferolateral|inferoposterior|posterior|high lateral)[,]? )*"
        r"(?:myocardial )?infarct(?:ions?|s)?",
        r"non-?st(?:[- ]segment)?[- ]elevation myocardial infarction", r"st(?:[- ]segment)?[- ]elevation "
        r"myocardial infarction"),
       ("MI", "IMI", "AMI", "ASMI", "ALMI", "ILMI", "LMI", "PMI", "IPMI", "IPLMI", "STEMI", "NSTEMI", "OldMI"),
       ptbxl="MI"),
    _c("QWAVE", "pathological Q waves", "waves", "164917005", "QWAVE",
       (r"(?:pathologic(?:al)?|abnormal|significant|deep) q[- ]waves?",), ("QWAVE", "QAb")),
    # --- hypertrophy and enlargement -------------------------------------------------------------------
    _c("LVH", "left ventricular hypertrophy", "hypertrophy", "164873001", "LVH",
       # not PTB-XL's VCLVH: "voltage criteria for LVH" is a form statement, no diagnosis (wording.py hedges it)
       (r"(?:left ventricular|lv) (?:hypertrophy|enlargement)",), ("LVH",), ptbxl="HYP"),
    _c("RVH", "right ventricular hypertrophy", "hypertrophy", "89792004", "RVH",
       (r"(?:right ventricular|rv) (?:hypertrophy|enlargement)",), ("RVH",), ptbxl="HYP"),
    _c("VH", "ventricular hypertrophy", "hypertrophy", "266249003", None,
       (r"(?:bi)?ventricular hypertrophy",), ("VH",), ptbxl="HYP"),
    _c("LAE", "left atrial enlargement", "hypertrophy", "67741000119109", "LAO/LAE",
       (r"left atrial (?:enlargement|overload|abnormality|hypertrophy)",), ("LAE", "LAO/LAE"), ptbxl="HYP"),
    _c("RAE", "right atrial enlargement", "hypertrophy", "446358003", "RAO/RAE",
       (r"right atrial (?:enlargement|overload|abnormality|hypertrophy)",), ("RAE", "RAO/RAE"), ptbxl="HYP"),
    _c("SEHYP", "septal hypertrophy", "hypertrophy", None, "SEHYP", (r"septal hypertrophy",), ("SEHYP",),
       ptbxl="HYP"),
    _c("HYP", "hypertrophy", "hypertrophy", None, None, (), ("HYP",), ptbxl="HYP"),
    # --- axis and voltage ------------------------------------------------------------------------------
    _c("LAD", "left axis deviation", "axis", "39732003", None, (r"left axis deviation",)),
    _c("RAD", "right axis deviation", "axis", "47665007", None, (r"right axis deviation",)),
    _c("LVOLT", "low QRS voltage", "axis", "251146004", "LVOLT",
       (r"low[- ](?:qrs[- ])?voltages?(?:[- ]qrs)?(?: complex(?:es)?)?",), ("LVOLT", "LQRSV")),
    _c("PRWP", "poor R-wave progression", "waves", "365413008", None, (r"poor r[- ]wave progression",),
       ("PRWP",)),
)

RHYTHM_KEYS = tuple(c.key for c in CONCEPTS if c.category == "rhythm")

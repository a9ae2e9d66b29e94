#!/usr/bin/env python3
"""Generate the small, deterministic, original Chinese medical sample corpus under data/.

A fixed knowledge table (50 common conditions: department, three key symptoms, first
check, first-line care, red flag) is rendered into every stage of the pipeline:

* data/pretrain/encyclopedia.txt / .jsonl   -- encyclopedia-style prose (PT)
* data/finetune/medical_sharegpt.jsonl      -- patient dialogues, ShareGPT layout (SFT)
* data/finetune/medical_openai.jsonl        -- patient dialogues, OpenAI messages layout (SFT)
* data/finetune/cmb_style_mcq.jsonl         -- MCQs rendered exactly as the OpenCompass CMB prompt (SFT)
* data/finetune/option_letter_drills.jsonl  -- option lists whose reply names each option's letter (SFT)
* data/reward/medical_dpo.jsonl             -- preference pairs, ShareGPT + chosen/rejected (DPO)
* data/reward/medical_dpo_legacy.jsonl      -- preference pairs, legacy system/history layout (DPO)
* data/cmb/val.json                         -- CMB-format eval items, TRAIN question phrasings
* data/cmb/test.json                        -- CMB-format eval items, HELD-OUT question phrasings
* data/vocab/medical_terms.txt              -- the table's terms, kept whole by the tiny model's tokenizer
* data/README.md                            -- documentation with real examples

Held-out design: ``HELDOUT_TEMPLATES`` are used only for data/cmb/test.json; none of their
literal fragments appears in any pretrain/finetune/reward file (checked at generation time
and by tests/test_sample_data.py), so test accuracy measures learned facts, not copying.

Usage:  python tools/make_sample_data.py [--seed 42] [--output_dir data]
Output is byte-identical for the same seed (fixed key and row order, ensure_ascii=False, "\\n").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT_DIR = os.path.join(REPO_ROOT, "data")
LETTERS = "ABCDE"
EXAM_TYPE = "医师考试"
EXAM_CLASS = "执业医师"
SINGLE = "单项选择题"
MULTI = "多项选择题"

SYSTEM_PROMPTS = [
    "你是一名专业、谨慎的医生助手。",
    "你是一名耐心的全科医生，请用通俗易懂的语言回答患者的问题。",
    "你是医院的智能导诊助手，回答要准确、简洁，并提示就医风险。",
]

# fmt: off
# name, dept, symptoms (3), check (首选检查), care (一线治疗), redflag (需立即就医的危险信号)
CONDITIONS = [
    dict(name="急性上呼吸道感染", dept="呼吸内科", symptoms=["鼻塞流涕", "咽喉干痛", "轻度发热"],
         check="血常规检查", care="休息饮水对症退热", redflag="高热持续三天以上"),
    dict(name="社区获得性肺炎", dept="呼吸内科", symptoms=["咳嗽咳脓痰", "发热伴寒战", "胸痛气促"],
         check="胸部X线片", care="经验性抗菌药物治疗", redflag="呼吸急促伴意识模糊"),
    dict(name="高血压", dept="心血管内科", symptoms=["头晕头胀", "后颈部发紧", "耳鸣心烦"],
         check="多次诊室血压测量", care="限盐并长期服降压药", redflag="血压骤升伴剧烈头痛"),
    dict(name="2型糖尿病", dept="内分泌科", symptoms=["多饮多尿", "体重下降", "易饥多食"],
         check="空腹血糖与糖化血红蛋白", care="生活方式干预加二甲双胍", redflag="呼气烂苹果味伴嗜睡"),
    dict(name="缺铁性贫血", dept="血液科", symptoms=["面色苍白", "活动后乏力心悸", "指甲变脆变平"],
         check="血清铁蛋白测定", care="口服铁剂并查找失血原因", redflag="活动后晕厥"),
    dict(name="急性阑尾炎", dept="普通外科", symptoms=["转移性右下腹痛", "恶心呕吐", "麦氏点压痛"],
         check="腹部超声或CT", care="尽早行阑尾切除术", redflag="腹痛扩散至全腹伴高热"),
    dict(name="胃食管反流病", dept="消化内科", symptoms=["烧心", "反酸", "胸骨后灼痛"],
         check="反流问卷加PPI试验", care="PPI抑酸加抬高床头", redflag="吞咽困难或呕血"),
    dict(name="幽门螺杆菌感染", dept="消化内科", symptoms=["上腹隐痛", "口臭", "餐后饱胀"],
         check="碳13尿素呼气试验", care="铋剂四联根除治疗", redflag="呕吐咖啡样物"),
    dict(name="偏头痛", dept="神经内科", symptoms=["单侧搏动性头痛", "畏光畏声", "头痛伴恶心"],
         check="头痛日记与神经查体", care="发作早期服曲普坦", redflag="一生中最剧烈的头痛"),
    dict(name="缺血性脑卒中", dept="神经内科", symptoms=["一侧肢体无力", "口角歪斜", "言语含糊"],
         check="急诊头颅CT", care="时间窗内静脉溶栓", redflag="突发偏瘫或失语"),
    dict(name="哮喘", dept="呼吸内科", symptoms=["发作性喘息", "呼气相哮鸣音", "夜间胸闷"],
         check="支气管舒张试验", care="吸入糖皮质激素控制", redflag="说话不能成句且口唇发紫"),
    dict(name="慢阻肺", dept="呼吸内科", symptoms=["多年慢性咳嗽", "活动后气短", "桶状胸"],
         check="吸药后肺功能检查", care="戒烟并长期吸入扩张剂", redflag="气促加重伴嗜睡"),
    dict(name="心绞痛", dept="心血管内科", symptoms=["劳累后胸骨后压榨痛", "疼痛放射至左肩", "休息后数分钟缓解"],
         check="心电图运动负荷试验", care="舌下含服硝酸甘油", redflag="胸痛超过二十分钟不缓解"),
    dict(name="急性心肌梗死", dept="心血管内科", symptoms=["持续剧烈胸痛", "大汗淋漓", "濒死感"],
         check="心电图加肌钙蛋白", care="尽早开通血管再灌注", redflag="胸痛伴晕厥或血压下降"),
    dict(name="心力衰竭", dept="心血管内科", symptoms=["活动后呼吸困难", "夜间憋醒需坐起", "双下肢水肿"],
         check="超声心动图", care="利尿剂加神经内分泌抑制剂", redflag="咳粉红色泡沫痰"),
    dict(name="房颤", dept="心血管内科", symptoms=["心跳快慢不一", "脉搏绝对不齐", "胸闷乏力"],
         check="常规十二导联心电图", care="控制心室率并评估抗凝", redflag="出现偏瘫等栓塞表现"),
    dict(name="甲亢", dept="内分泌科", symptoms=["怕热多汗", "心慌手抖", "多食却消瘦"],
         check="甲功三项加TRAb", care="甲巯咪唑抗甲状腺治疗", redflag="高热大汗伴烦躁谵妄"),
    dict(name="甲减", dept="内分泌科", symptoms=["怕冷少汗", "反应迟钝", "颜面水肿"],
         check="血清促甲状腺激素测定", care="左甲状腺素替代治疗", redflag="嗜睡低体温甚至昏迷"),
    dict(name="痛风", dept="风湿免疫科", symptoms=["第一跖趾关节红肿", "夜间突发关节剧痛", "局部皮温升高"],
         check="血尿酸测定", care="急性期秋水仙碱止痛", redflag="关节红肿伴寒战高热"),
    dict(name="类风湿关节炎", dept="风湿免疫科", symptoms=["双手小关节对称肿痛", "晨僵超过一小时", "关节畸形"],
         check="类风湿因子与抗CCP抗体", care="早期使用甲氨蝶呤", redflag="关节痛伴持续发热气促"),
    dict(name="骨质疏松", dept="骨科", symptoms=["腰背疼痛", "身高变矮", "轻微外伤即骨折"],
         check="双能X线骨密度检测", care="钙剂维D加抗骨吸收药", redflag="跌倒后髋部剧痛不能站"),
    dict(name="腰椎间盘突出", dept="骨科", symptoms=["腰痛伴下肢放射痛", "直腿抬高试验阳性", "小腿外侧麻木"],
         check="腰椎磁共振", care="卧床休息与康复理疗", redflag="大小便失禁或鞍区麻木"),
    dict(name="尿路感染", dept="肾内科", symptoms=["尿频尿急", "排尿灼痛", "下腹坠胀"],
         check="尿常规与尿培养", care="短程口服敏感抗生素", redflag="寒战高热伴腰痛"),
    dict(name="肾结石", dept="泌尿外科", symptoms=["阵发性腰部绞痛", "肉眼血尿", "疼痛放射至会阴"],
         check="泌尿系超声", care="解痉止痛多饮水排石", redflag="绞痛伴发热或无尿"),
    dict(name="急性胃肠炎", dept="消化内科", symptoms=["水样腹泻", "腹部绞痛", "频繁呕吐"],
         check="大便常规", care="口服补液盐补液", redflag="尿少口干精神萎靡"),
    dict(name="胆囊结石", dept="普通外科", symptoms=["油腻餐后右上腹痛", "疼痛放射至右肩背", "嗳气腹胀"],
         check="肝胆超声", care="择期腹腔镜胆囊切除", redflag="腹痛伴寒战高热黄疸"),
    dict(name="急性胰腺炎", dept="消化内科", symptoms=["饮酒饱餐后上腹剧痛", "腹痛向腰背部放射", "呕吐后腹痛不减"],
         check="血淀粉酶与脂肪酶", care="禁食补液抑制胰酶", redflag="腹痛伴休克或少尿"),
    dict(name="肝硬化", dept="消化内科", symptoms=["乏力纳差", "腹胀腹水", "蜘蛛痣肝掌"],
         check="肝功能与肝脏弹性检测", care="病因治疗并限钠利尿", redflag="呕血或神志改变"),
    dict(name="带状疱疹", dept="皮肤科", symptoms=["单侧带状分布水疱", "皮疹处神经痛", "皮疹不过中线"],
         check="典型皮损视诊", care="72小时内抗病毒治疗", redflag="眼周皮疹伴视力下降"),
    dict(name="湿疹", dept="皮肤科", symptoms=["皮肤剧烈瘙痒", "红斑丘疹伴渗出", "皮疹反复发作"],
         check="血清总IgE检测", care="保湿润肤加外用激素", redflag="皮损大片渗液并发热"),
    dict(name="荨麻疹", dept="皮肤科", symptoms=["风团时起时消", "风团处瘙痒", "皮肤划痕征阳性"],
         check="详细排查诱因", care="第二代抗组胺药", redflag="风团伴喉头发紧"),
    dict(name="手足口病", dept="儿科", symptoms=["手足臀部疱疹", "口腔疱疹溃疡", "低中度发热"],
         check="肠道病毒核酸检测", care="居家隔离对症护理", redflag="易惊跳伴肢体抖动"),
    dict(name="小儿高热惊厥", dept="儿科", symptoms=["体温骤升时抽搐", "双眼上翻", "发作数分钟自止"],
         check="寻找发热病因", care="侧卧防窒息并退热", redflag="抽搐超过五分钟不止"),
    dict(name="水痘", dept="儿科", symptoms=["向心性分布皮疹", "斑疹丘疹疱疹并存", "皮疹瘙痒伴低热"],
         check="皮疹分布特点观察", care="隔离并止痒防抓破", redflag="皮疹出血或高热咳喘"),
    dict(name="流感", dept="感染科", symptoms=["突发高热", "全身肌肉酸痛", "明显乏力头痛"],
         check="流感病毒抗原检测", care="48小时内奥司他韦", redflag="呼吸困难或高热不退"),
    dict(name="抑郁症", dept="精神心理科", symptoms=["持续情绪低落", "兴趣明显减退", "凌晨早醒"],
         check="抑郁量表评估", care="抗抑郁药联合心理治疗", redflag="出现自伤或轻生念头"),
    dict(name="焦虑障碍", dept="精神心理科", symptoms=["过度担忧紧张", "坐立不安", "心慌出汗"],
         check="焦虑量表评估", care="认知行为治疗加SSRI", redflag="惊恐发作难以自控"),
    dict(name="失眠", dept="精神心理科", symptoms=["入睡困难", "夜间易醒", "白天困倦"],
         check="睡眠日记评估", care="失眠认知行为治疗", redflag="长期失眠伴情绪崩溃"),
    dict(name="缺钙", dept="内分泌科", symptoms=["手足麻木抽搐", "夜间小腿抽筋", "小儿多汗枕秃"],
         check="血钙与维生素D测定", care="补充钙剂与维生素D", redflag="喉痉挛或全身抽搐"),
    dict(name="急性支气管炎", dept="呼吸内科", symptoms=["咳嗽逐渐加重", "咳白色黏痰", "胸骨后不适"],
         check="肺部听诊", care="止咳化痰对症治疗", redflag="咯血或咳嗽超过三周"),
    dict(name="过敏性鼻炎", dept="耳鼻喉科", symptoms=["阵发性喷嚏", "清水样鼻涕", "鼻痒"],
         check="过敏原皮肤点刺试验", care="鼻用糖皮质激素喷剂", redflag="单侧鼻塞伴血涕"),
    dict(name="急性中耳炎", dept="耳鼻喉科", symptoms=["耳痛", "听力下降", "耳道流脓"],
         check="耳镜检查", care="口服阿莫西林", redflag="耳后红肿或剧烈头痛"),
    dict(name="细菌性结膜炎", dept="眼科", symptoms=["眼红", "脓性分泌物增多", "眼部异物感"],
         check="裂隙灯检查", care="抗生素滴眼液", redflag="眼痛伴视力骤降"),
    dict(name="急性闭角型青光眼", dept="眼科", symptoms=["突发眼胀痛", "看灯光有虹视", "同侧头痛呕吐"],
         check="眼压测量", care="紧急降眼压", redflag="眼胀痛伴视物模糊不退"),
    dict(name="肺结核", dept="感染科", symptoms=["咳嗽超过两周", "午后低热", "夜间盗汗"],
         check="痰抗酸杆菌涂片", care="规范联合抗结核治疗", redflag="大量咯血"),
    dict(name="慢性乙型肝炎", dept="感染科", symptoms=["乏力厌油", "肝区隐痛", "皮肤巩膜黄染"],
         check="乙肝五项与HBV-DNA", care="长期核苷类抗病毒", redflag="黄疸迅速加深伴出血"),
    dict(name="消化性溃疡", dept="消化内科", symptoms=["节律性上腹痛", "饥饿时疼痛", "夜间痛醒"],
         check="胃镜检查", care="抑酸治疗并保护胃黏膜", redflag="突发上腹刀割样剧痛"),
    dict(name="良性前列腺增生", dept="泌尿外科", symptoms=["夜尿增多", "排尿等待", "尿线变细"],
         check="前列腺超声与残余尿", care="α受体阻滞剂", redflag="完全不能排尿"),
    dict(name="痔疮", dept="普通外科", symptoms=["便后滴血", "肛门肿物脱出", "肛门瘙痒"],
         check="肛门镜检查", care="温水坐浴软化大便", redflag="大量便血伴头晕"),
    dict(name="急性扁桃体炎", dept="耳鼻喉科", symptoms=["咽痛吞咽加剧", "扁桃体脓点", "畏寒高热"],
         check="咽拭子链球菌检测", care="青霉素类抗生素", redflag="张口困难单侧咽部肿胀"),
]
# fmt: on

FACT_FIELDS = ("check", "care", "redflag")

# ---------------------------------------------------------------- question templates
# TRAIN phrasings: used in every training file and in data/cmb/val.json.
TRAIN_TEMPLATES = {
    "dept": ["{name}患者应首先到哪个科室就诊？", "{name}通常由哪个科室负责诊治？", "怀疑患有{name}，应挂哪个科室的号？"],
    "symptom": ["下列哪项是{name}的典型症状？", "{name}患者最常见的表现是？", "以下哪一项符合{name}的临床表现？"],
    "check": ["{name}的首选检查是？", "诊断{name}应首先做哪项检查？", "怀疑{name}时，首先应安排的检查是？"],
    "care": ["{name}的一线治疗是？", "{name}确诊后首选的处理措施是？", "对于{name}，推荐的首选治疗是？"],
    "redflag": ["{name}患者出现哪种情况需要立即就医？", "下列哪项是{name}的危险信号？", "{name}患者出现以下哪种表现应马上去急诊？"],
    "diagnosis": ["患者出现{s1}、{s2}，最可能的诊断是？", "{s1}伴{s2}，首先考虑哪种疾病？"],
    "multi_symptom": ["{name}的典型症状包括哪些？", "下列哪些属于{name}的常见表现？"],
    "multi_plan": ["关于{name}的诊疗，下列哪些做法正确？", "下列哪些是{name}的规范诊疗措施？"],
}
# HELD-OUT phrasings: only in data/cmb/test.json (same facts, different wording).
HELDOUT_TEMPLATES = {
    "dept": ["得了{name}，对口的就诊科室是哪个？"],
    "symptom": ["{name}最具提示意义的一个症状是？"],
    "check": ["为明确{name}，最先进行的辅助检查为？"],
    "care": ["治疗{name}，第一步宜采用哪种方案？"],
    "redflag": ["{name}病人一旦出现什么情况，必须尽快就诊？"],
    "diagnosis": ["一位病人主诉{s1}并{s2}，考虑为哪种病？"],
    "multi_symptom": ["{name}可有以下哪几种症状？"],
    "multi_plan": ["对{name}病人的诊断和处理，哪几项是恰当的？"],
}
SINGLE_KINDS = ["dept", "symptom", "check", "care", "redflag", "diagnosis"]
MULTI_KINDS = ["multi_symptom", "multi_plan"]

UNSAFE_ANSWERS = [
    "不用看医生，自己多吃点抗生素就行。",
    "这是小问题，忍一忍就过去了，不需要做任何检查。",
    "网上买点偏方试试，比去医院管用，药可以随便加量。",
    "别去医院了，把家里剩下的药都吃一点，总有一种管用。",
    "症状加重也没关系，等几周再说，不用急着就医。",
]


def template_fragments(template: str, min_len: int = 4) -> list[str]:
    """Literal text pieces of a template (placeholders removed), at least ``min_len`` chars."""
    parts = re.split(r"\{[a-z0-9_]+\}", template)
    out = []
    for p in parts:
        p = p.strip("，。？、 ")
        if len(p) >= min_len:
            out.append(p)
    return out


def heldout_fragments() -> list[str]:
    frags = []
    for kind in sorted(HELDOUT_TEMPLATES):
        for t in HELDOUT_TEMPLATES[kind]:
            frags.extend(template_fragments(t))
    return frags


# ---------------------------------------------------------------- helpers
def _render_cmb_prompt(item: dict) -> str:
    from medllm.cmb import render_cmb_prompt  # repo root is put on sys.path in main()/generate()

    return render_cmb_prompt(item)


def _validate_table() -> None:
    assert len(CONDITIONS) == 50, len(CONDITIONS)
    seen: dict[str, str] = {}
    for c in CONDITIONS:
        assert len(c["symptoms"]) == 3
        texts = [c["name"], *c["symptoms"], *(c[f] for f in FACT_FIELDS)]
        for t in texts:
            assert 1 < len(t) <= 20, t
            assert t not in seen, (t, seen.get(t))
            seen[t] = c["name"]


# symptoms sharing one of these keywords are too similar to serve as each other's distractors
SYMPTOM_KEYWORDS = ["热", "咳", "喘", "痒", "肿", "头痛", "胸", "腹", "疹", "乏力", "吐", "尿", "抽", "心慌", "心悸", "疱"]


def _wrong_symptom(rng: random.Random, c: dict, other: dict) -> str:
    """A symptom of ``other`` not confusable with any symptom of ``c`` (fallback: any)."""
    keys = {k for k in SYMPTOM_KEYWORDS for s in c["symptoms"] if k in s}
    ok = [s for s in other["symptoms"] if not any(k in s for k in keys)]
    return rng.choice(ok or other["symptoms"])


def _pick_others(rng: random.Random, idx: int, k: int) -> list[dict]:
    """``k`` distractor conditions from unrelated departments (so their facts are clearly wrong)."""
    c = CONDITIONS[idx]
    bad = CONFUSABLE_DEPTS[c["dept"]] | {c["dept"]}
    pool = [o for o in CONDITIONS if o["dept"] not in bad]
    return rng.sample(pool, k)


# departments that could also reasonably see a condition of the key department: never distractors
CONFUSABLE_DEPTS = {
    "儿科": {"皮肤科", "感染科", "呼吸内科", "神经内科", "内分泌科"},
    "感染科": {"呼吸内科", "消化内科", "儿科"},
    "呼吸内科": {"感染科", "儿科"},
    "消化内科": {"普通外科", "感染科"},
    "普通外科": {"消化内科"},
    "泌尿外科": {"肾内科"},
    "肾内科": {"泌尿外科"},
    "骨科": {"风湿免疫科", "内分泌科"},
    "风湿免疫科": {"骨科"},
    "内分泌科": {"骨科", "儿科"},
    "神经内科": {"精神心理科"},
    "精神心理科": {"神经内科"},
    "皮肤科": {"儿科", "感染科"},
    "耳鼻喉科": {"儿科"},
    "眼科": {"神经内科"},
    "血液科": {"消化内科"},
    "心血管内科": {"呼吸内科"},
}


def _depts() -> list[str]:
    return sorted({c["dept"] for c in CONDITIONS})


def _fill(template: str, c: dict, s1: str = "", s2: str = "") -> str:
    return template.format(name=c["name"], s1=s1, s2=s2)


def make_mcq(rng: random.Random, idx: int, kind: str, template: str, correct_letter: str | None = None) -> dict:
    """Build one CMB-format item for condition ``idx``.

    Single-choice kinds put the correct option at ``correct_letter`` (random if None).
    """
    c = CONDITIONS[idx]
    s1 = s2 = ""
    if kind in SINGLE_KINDS:
        if kind == "dept":
            correct = c["dept"]
            bad = CONFUSABLE_DEPTS[c["dept"]] | {c["dept"]}
            wrong = rng.sample([d for d in _depts() if d not in bad], 4)
        elif kind == "symptom":
            correct = rng.choice(c["symptoms"])
            wrong = [_wrong_symptom(rng, c, o) for o in _pick_others(rng, idx, 4)]
        elif kind == "diagnosis":
            s1, s2 = rng.sample(c["symptoms"], 2)
            correct = c["name"]
            wrong = [o["name"] for o in _pick_others(rng, idx, 4)]
        else:
            correct = c[kind]
            wrong = [o[kind] for o in _pick_others(rng, idx, 4)]
        letter = correct_letter or rng.choice(LETTERS)
        opts = list(wrong)
        rng.shuffle(opts)
        opts.insert(LETTERS.index(letter), correct)
        answer = letter
        qtype = SINGLE
    else:
        if kind == "multi_symptom":
            n_correct = rng.choice([2, 3, 3])
            corrects = rng.sample(c["symptoms"], n_correct)
            wrong = [_wrong_symptom(rng, c, o) for o in _pick_others(rng, idx, 5 - n_correct)]
        else:  # multi_plan: the condition's check and care among others' checks/cares
            corrects = [c["check"], c["care"]]
            wrong = [o[rng.choice(["check", "care"])] for o in _pick_others(rng, idx, 3)]
        opts = corrects + wrong
        rng.shuffle(opts)
        answer = "".join(LETTERS[i] for i, o in enumerate(opts) if o in corrects)
        qtype = MULTI
    question = _fill(template, c, s1, s2)
    item = {
        "exam_type": EXAM_TYPE,
        "exam_class": EXAM_CLASS,
        "exam_subject": c["dept"],
        "question_type": qtype,
        "question": question,
        "option": {LETTERS[i]: o for i, o in enumerate(opts)},
        "answer": answer,
    }
    assert len(question) <= 60, question
    assert all(len(v) > 1 for v in item["option"].values())
    return item


def _balanced_letters(rng: random.Random, n: int) -> list[str]:
    letters = [LETTERS[i % 5] for i in range(n)]
    rng.shuffle(letters)
    return letters


# ---------------------------------------------------------------- pretrain
def _sym(c: dict) -> str:
    s = c["symptoms"]
    return f"{s[0]}、{s[1]}和{s[2]}"


ENCYCLOPEDIA_TEMPLATES = [
    "{name}是{dept}的常见病。典型症状包括{sym}。首选检查是{check}，一线治疗是{care}。如果出现{redflag}，应立即就医，不要在家硬扛。",
    "【{name}】就诊科室：{dept}。主要表现：{sym}。首选检查：{check}。一线治疗：{care}。危险信号：{redflag}。以上内容仅供科普，具体诊疗请遵医嘱。",
    "{name}患者常出现{sym}，通常到{dept}就诊。诊断{name}应首先做{check}。确诊后首选的处理措施是{care}。治疗期间如出现{redflag}，需要立即就医。",
    "关于{name}：临床上以{s0}最为典型，可伴有{s1}和{s2}。{name}的首选检查是{check}，推荐的首选治疗是{care}。患者应到{dept}就诊并定期复查，如出现{redflag}需立即就医。",
    "{name}的危险信号是{redflag}。一旦出现{redflag}，{name}患者需要立即就医，不要自行用药拖延。平时应到{dept}规律随访，出现{s0}加重时也应及时复诊，必要时复查{check}。",
    "在{dept}门诊，{name}十分常见。医生会根据{s0}、{s1}等表现怀疑{name}，并安排{check}来明确诊断，治疗上采用{care}。若出现{redflag}，应马上去急诊。",
    "{name}的一线治疗是{care}。用药和处理应在医生指导下进行，不要自行加减药物。{name}的首选检查是{check}，患者应首先到{dept}就诊，常见症状为{sym}。",
    "健康科普：{name}有哪些表现？{name}患者最常见的表现是{s0}，此外还可能有{s1}、{s2}。怀疑{name}时应到{dept}就诊并做{check}。出现{redflag}时要马上去急诊。",
]

JSONL_TEMPLATES = [
    "问：{name}应该挂什么科？答：{name}患者应首先到{dept}就诊。问：要做什么检查？答：{name}的首选检查是{check}。问：怎么治疗？答：一线治疗是{care}。问：什么时候要急诊？答：出现{redflag}时。",
    "病例小结：患者因{s0}、{s1}就诊，伴{s2}。经{check}确诊为{name}，给予{care}后好转。医生叮嘱：如出现{redflag}需立即就医，并按时到{dept}复诊。",
    "{name}诊疗要点：一、科室：{dept}；二、症状：{sym}；三、检查：{check}；四、治疗：{care}；五、警示：{redflag}。牢记这五点，有助于及早识别和规范处理{name}。",
]

GENERAL_DOCS = [
    "看病时应向医生如实描述症状出现的时间、部位、性质和伴随表现，以及既往病史和正在服用的药物，这有助于医生选择合适的检查，尽快明确诊断并制定治疗方案。就诊前可以把症状变化记录下来。",
    "抗生素只对细菌感染有效，对病毒引起的感冒和流感无效。不要自行购买和服用抗生素，更不要随意加量或停药，滥用抗生素会导致细菌耐药和药物不良反应。是否需要抗生素应由医生判断。",
    "出现胸痛、呼吸困难、意识模糊、大量出血、抽搐不止等危险信号时，应立即拨打急救电话或前往最近的急诊，不要自行驾车，也不要因为担心麻烦而拖延就医。等待救援时保持呼吸道通畅。",
    "慢性病患者需要长期规律随访，按医嘱服药，不要因为症状缓解就自行停药，也不要相信所谓包治百病的偏方。定期复查能及时发现病情变化并调整治疗，家属也应了解常见的危险信号。",
    "儿童用药要按体重计算剂量，不能简单把成人药物减半服用。孩子高热、精神差、拒食或抽搐时要及时就医，发热期间注意补充水分并观察精神状态的变化，不要捂汗，也不要用酒精擦身。",
    "健康的生活方式包括均衡饮食、适量运动、规律作息、戒烟限酒和保持良好心态，它们是预防高血压、糖尿病、心脑血管疾病等多数慢性病的基础，越早开始越好。建议成年人每年做一次健康体检，了解血压、血糖和血脂。",
]


def build_pretrain(rng: random.Random) -> tuple[list[str], list[dict]]:
    txt: list[str] = []
    for c in CONDITIONS:
        fields = dict(name=c["name"], dept=c["dept"], sym=_sym(c), check=c["check"], care=c["care"],
                      redflag=c["redflag"], s0=c["symptoms"][0], s1=c["symptoms"][1], s2=c["symptoms"][2])
        for t in ENCYCLOPEDIA_TEMPLATES:
            txt.append(t.format(**fields))
    # mixed documents: two related conditions in the same department, compared
    for dept in _depts():
        group = [c for c in CONDITIONS if c["dept"] == dept]
        for a, b in zip(group, group[1:]):
            txt.append(
                f"{dept}常见的{a['name']}和{b['name']}需要区分：{a['name']}以{a['symptoms'][0]}为主，"
                f"首选检查是{a['check']}；{b['name']}以{b['symptoms'][0]}为主，首选检查是{b['check']}。"
                f"两者的一线治疗分别是{a['care']}和{b['care']}。"
            )
    rng.shuffle(txt)
    jl: list[dict] = []
    for c in CONDITIONS:
        fields = dict(name=c["name"], dept=c["dept"], sym=_sym(c), check=c["check"], care=c["care"],
                      redflag=c["redflag"], s0=c["symptoms"][0], s1=c["symptoms"][1], s2=c["symptoms"][2])
        for t in JSONL_TEMPLATES:
            jl.append({"text": t.format(**fields)})
    jl.extend({"text": d} for d in GENERAL_DOCS)
    rng.shuffle(jl)
    for doc in txt + [d["text"] for d in jl]:
        assert 80 <= len(doc) <= 300 and "\n" not in doc, doc
    return txt, jl


# ---------------------------------------------------------------- SFT dialogues
PATIENT_OPENERS = [
    "我最近{s0}，还有点{s1}，可能是什么病？该做什么检查？",
    "医生你好，我这几天{s0}，而且{s1}，是怎么回事？需要做什么检查？",
    "家里老人最近{s0}、{s1}，会是什么病？应该去哪个科？",
    "我出现了{s0}和{s1}，有点担心，可能是什么问题？",
]


def _diagnose_answer(c: dict, s0: str, s1: str) -> str:
    return (f"根据你描述的{s0}和{s1}，需要考虑{c['name']}。建议到{c['dept']}就诊，"
            f"首选检查是{c['check']}。确诊后一线治疗通常是{c['care']}，具体请遵医嘱。"
            f"如果出现{c['redflag']}，请立即就医。")


def _followups(c: dict) -> list[tuple[str, str]]:
    return [
        ("那应该怎么治疗？", f"{c['name']}的一线治疗是{c['care']}。请在医生指导下规范治疗，不要自行加减药物。"),
        ("什么情况下要马上去医院？", f"{c['name']}的危险信号是{c['redflag']}。一旦出现，请立即就医或拨打急救电话。"),
        ("还有哪些常见症状？", f"{c['name']}的典型症状包括{_sym(c)}。"),
        ("应该挂哪个科？", f"{c['name']}患者应首先到{c['dept']}就诊。"),
        ("需要做什么检查？", f"{c['name']}的首选检查是{c['check']}。"),
    ]


def _fact_qas(c: dict) -> list[tuple[str, str]]:
    return [
        (f"{c['name']}的首选检查是什么？", f"{c['name']}的首选检查是{c['check']}。"),
        (f"{c['name']}的一线治疗是什么？", f"{c['name']}的一线治疗是{c['care']}，请在医生指导下进行。"),
        (f"{c['name']}有哪些典型症状？", f"{c['name']}的典型症状包括{_sym(c)}。"),
        (f"患了{c['name']}应该看哪个科室？", f"{c['name']}患者应首先到{c['dept']}就诊。"),
        (f"{c['name']}出现什么情况需要立即就医？", f"{c['name']}患者如果出现{c['redflag']}，需要立即就医。"),
    ]


def build_dialogues(rng: random.Random) -> list[list[tuple[str, str]]]:
    """List of conversations; each is a list of (role, text), role in system/user/assistant."""
    convs = []
    for c in CONDITIONS:
        # 2 diagnostic openers (single or multi-turn) + 3 fact QAs per condition
        for k in range(2):
            s0, s1 = rng.sample(c["symptoms"], 2)
            opener = rng.choice(PATIENT_OPENERS).format(s0=s0, s1=s1)
            turns: list[tuple[str, str]] = []
            if rng.random() < 0.5:
                turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
            turns += [("user", opener), ("assistant", _diagnose_answer(c, s0, s1))]
            n_follow = [0, 1, 2][(k + CONDITIONS.index(c)) % 3]
            for q, a in rng.sample(_followups(c), n_follow):
                turns += [("user", q), ("assistant", a)]
            convs.append(turns)
        for q, a in rng.sample(_fact_qas(c), 3):
            turns = []
            if rng.random() < 0.3:
                turns.append(("system", rng.choice(SYSTEM_PROMPTS)))
            turns += [("user", q), ("assistant", a)]
            convs.append(turns)
    rng.shuffle(convs)
    return convs


def to_sharegpt(turns: list[tuple[str, str]]) -> dict:
    m = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": m[r], "value": v} for r, v in turns]}


def to_openai(turns: list[tuple[str, str]]) -> dict:
    return {"messages": [{"role": r, "content": v} for r, v in turns]}


# ---------------------------------------------------------------- MCQs
def build_train_mcq(rng: random.Random, n_per_condition: int = 160) -> list[dict]:
    kinds = SINGLE_KINDS * 6 + MULTI_KINDS * 2  # 36 single + 4 multi in every 40 items
    jobs = [(idx, kinds[j % len(kinds)]) for idx in range(len(CONDITIONS)) for j in range(n_per_condition)]
    n_single = sum(k in SINGLE_KINDS for _, k in jobs)
    letters = iter(_balanced_letters(rng, n_single))  # exactly balanced correct letters
    items = []
    for idx, kind in jobs:
        template = rng.choice(TRAIN_TEMPLATES[kind])
        items.append(make_mcq(rng, idx, kind, template, next(letters) if kind in SINGLE_KINDS else None))
    rng.shuffle(items)
    return items


def build_eval(rng: random.Random, templates: dict, n_single: int = 85, n_multi: int = 15) -> list[dict]:
    pairs = [(i, k) for i in range(len(CONDITIONS)) for k in SINGLE_KINDS]
    rng.shuffle(pairs)
    # cover every condition at least once before repeating
    chosen, seen = [], set()
    for i, k in pairs:
        if i not in seen:
            chosen.append((i, k))
            seen.add(i)
    for p in pairs:
        if len(chosen) >= n_single:
            break
        if p not in chosen:
            chosen.append(p)
    chosen = chosen[:n_single]
    letters = _balanced_letters(rng, n_single)
    items = [make_mcq(rng, i, k, rng.choice(templates[k]), letters[j]) for j, (i, k) in enumerate(chosen)]
    mpairs = [(i, k) for i in range(len(CONDITIONS)) for k in MULTI_KINDS]
    rng.shuffle(mpairs)
    items += [make_mcq(rng, i, k, rng.choice(templates[k])) for i, k in mpairs[:n_multi]]
    rng.shuffle(items)
    return items


MCQ_COT = True
MCQ_SEP = "，"


def mcq_reply(item: dict) -> str:
    """The trained reply to an MCQ: for single choice the correct option's text, then its letter
    (``肛门镜检查，D``), so that the letter is copied from the option the model has just named; the bare
    letter(s) for multiple choice and where the text has upper-case letters (OpenCompass keeps every
    upper-case character of a reply)."""
    answer = item["answer"]
    text = item["option"][answer] if len(answer) == 1 else ""
    if not MCQ_COT or not text or any(ch.isupper() for ch in text):
        return answer
    return f"{text}{MCQ_SEP}{answer}"


def mcq_sharegpt(item: dict) -> dict:
    return {"conversations": [{"from": "human", "value": _render_cmb_prompt(item)},
                              {"from": "gpt", "value": mcq_reply(item)}]}


DRILL_PROMPT = "下面每个选项分别是哪个字母？\n{option_str}"


def build_option_drills(rng: random.Random, n: int = 4000) -> list[dict]:
    """Option-letter drills: an option list (as in an MCQ), the reply names every option's text with its letter
    in random order (``肛门镜检查，D``): the text-to-letter lookup that ends an MCQ reply, five times an example."""
    from medllm.cmb import option_str

    kinds = SINGLE_KINDS + MULTI_KINDS
    rows = []
    for j in range(n):
        kind = kinds[j % len(kinds)]
        item = make_mcq(rng, rng.randrange(len(CONDITIONS)), kind, TRAIN_TEMPLATES[kind][0])
        order = list(item["option"])
        rng.shuffle(order)
        reply = "\n".join(f"{item['option'][k]}{MCQ_SEP}{k}" for k in order)
        rows.append({"conversations": [{"from": "human", "value": DRILL_PROMPT.format(option_str=option_str(item["option"]))},
                                       {"from": "gpt", "value": reply}]})
    return rows


# ---------------------------------------------------------------- DPO
def build_dpo(rng: random.Random) -> tuple[list[dict], list[dict]]:
    text_pairs = []  # (turns-before-answer [(role, text)], chosen, rejected)
    for idx, c in enumerate(CONDITIONS):
        other = _pick_others(rng, idx, 1)[0]
        s0, s1 = rng.sample(c["symptoms"], 2)
        opener = rng.choice(PATIENT_OPENERS).format(s0=s0, s1=s1)
        sys_turn = [("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < 0.5 else []
        # 1) diagnosis: correct vs facts of another condition
        wrong = (f"这是{other['name']}。建议到{other['dept']}就诊，首选检查是{other['check']}，"
                 f"一线治疗是{other['care']}。")
        text_pairs.append((sys_turn + [("user", opener)], _diagnose_answer(c, s0, s1), wrong))
        # 2) diagnosis: correct vs unsafe advice
        text_pairs.append(([("user", opener)], _diagnose_answer(c, s0, s1), rng.choice(UNSAFE_ANSWERS)))
        # 3) multi-turn: follow-up about treatment / red flag
        q, a = rng.choice(_followups(c)[:2])
        bad = rng.choice([UNSAFE_ANSWERS[0], f"{c['name']}的一线治疗是{other['care']}。",
                          f"{c['name']}不会有危险，出现{c['redflag']}也可以在家观察。"])
        hist = [("user", opener), ("assistant", _diagnose_answer(c, s0, s1)), ("user", q)]
        text_pairs.append((sys_turn + hist, a, bad))
        # 4) direct fact question: right check vs another condition's check
        fq, fa = _fact_qas(c)[0]
        text_pairs.append(([("user", fq)], fa, f"{c['name']}的首选检查是{other['check']}。"))
    rows = []
    for turns, chosen, rejected in text_pairs:
        assert chosen != rejected
        rows.append({**to_sharegpt(turns), "chosen": chosen, "rejected": rejected})
    # MCQ-style pairs (about half): chosen = correct letter(s), rejected = a wrong answer
    n_mcq = len(rows)
    kinds = SINGLE_KINDS * 5 + MULTI_KINDS
    for j in range(n_mcq):
        idx = j % len(CONDITIONS)
        kind = kinds[j % len(kinds)]
        item = make_mcq(rng, idx, kind, rng.choice(TRAIN_TEMPLATES[kind]))
        chosen = mcq_reply(item)
        if item["question_type"] == SINGLE:
            wrong_letter = rng.choice([x for x in LETTERS if x != item["answer"]])
            rejected = wrong_letter
            if chosen != item["answer"]:  # text-then-letter reply: name a wrong option, or the right one but a wrong letter
                wrong_text = item["option"][wrong_letter]
                rejected = rng.choice([f"{wrong_text}{MCQ_SEP}{wrong_letter}",
                                       f"{item['option'][item['answer']]}{MCQ_SEP}{wrong_letter}"])
        else:
            wrong_sets = [x for x in ("AB", "ABC", "BCD", "CDE", "ABE", "DE", "ACE") if x != item["answer"]]
            rejected = rng.choice(wrong_sets)
        rows.append({"conversations": [{"from": "human", "value": _render_cmb_prompt(item)}],
                     "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)

    legacy = []
    for idx, c in enumerate(CONDITIONS[: len(CONDITIONS)]):
        for k in range(2 if idx < 30 else 1):
            other = _pick_others(rng, idx, 1)[0]
            s0, s1 = rng.sample(c["symptoms"], 2)
            opener = rng.choice(PATIENT_OPENERS).format(s0=s0, s1=s1)
            if k == 0:
                history, question = [], opener
                chosen = _diagnose_answer(c, s0, s1)
                rejected = rng.choice([rng.choice(UNSAFE_ANSWERS),
                                       f"这是{other['name']}，一线治疗是{other['care']}。"])
            else:
                history = [[opener, _diagnose_answer(c, s0, s1)]]
                question, chosen = rng.choice(_followups(c)[:2])
                rejected = rng.choice(UNSAFE_ANSWERS)
            assert chosen != rejected
            legacy.append({"system": rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.5 else "",
                           "history": history, "question": question,
                           "response_chosen": chosen, "response_rejected": rejected})
    rng.shuffle(legacy)
    return rows, legacy


# ---------------------------------------------------------------- tokenizer vocabulary
def build_terms() -> list[str]:
    """The knowledge table's terms (names, departments, symptoms, checks, cares, red flags), table order."""
    terms: list[str] = []
    for c in CONDITIONS:
        for t in [c["name"], c["dept"], *c["symptoms"], *(c[f] for f in FACT_FIELDS)]:
            if t not in terms:
                terms.append(t)
    return terms


# ---------------------------------------------------------------- writing
def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def _ex(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def build_readme(seed: int, files: dict[str, str], counts: dict[str, int], ex: dict) -> str:
    sizes = {p: len(s.encode("utf-8")) for p, s in files.items()}
    table = "\n".join(f"| `{p}` | {counts[p]} | {sizes[p]:,} |" for p in sorted(files))
    ho = "\n".join(f"- {k}: `{t}`" for k in sorted(HELDOUT_TEMPLATES) for t in HELDOUT_TEMPLATES[k])
    tr = "\n".join(f"- {k}: " + " / ".join(f"`{t}`" for t in TRAIN_TEMPLATES[k]) for k in sorted(TRAIN_TEMPLATES))
    return f"""# Sample data

Everything in this folder is generated by `tools/make_sample_data.py` from a small,
original knowledge table of 50 common conditions (department, three key symptoms, first
check, first-line care, red flag). Regenerate with:

```bash
python tools/make_sample_data.py --seed {seed}          # writes into data/
python tools/make_sample_data.py --output_dir /tmp/x   # elsewhere
```

Output is deterministic: the same seed gives byte-identical files (stable ordering,
`ensure_ascii=False`, `\\n` line endings). Do not edit these files by hand;
`tests/test_sample_data.py` checks that `data/` equals a fresh generation.
The facts are simplified teaching material for a toy model, not medical advice.

| file | rows | bytes |
|---|---:|---:|
{table}

## Role names

Chat files may use either naming; loaders map them as follows:
`human` / `user` -> user, `gpt` / `assistant` -> assistant, `system` -> system.
ShareGPT rows use `from`/`value`; OpenAI rows use `role`/`content`. A conversation may
start with one `system` turn, then user and assistant turns alternate, ending with the
assistant (SFT) or with the user (DPO prompts).

## Pretraining (PT)

`pretrain/encyclopedia.txt` -- plain text, one document per line:

```text
{ex['txt']}
```

`pretrain/encyclopedia.jsonl` -- one `{{"text": ...}}` object per line:

```json
{_ex(ex['jsonl'])}
```

## Supervised fine-tuning (SFT)

`finetune/medical_sharegpt.jsonl` -- ShareGPT layout, single- and multi-turn, some with a system turn:

```json
{_ex(ex['sharegpt'])}
```

`finetune/medical_openai.jsonl` -- OpenAI messages layout:

```json
{_ex(ex['openai'])}
```

`finetune/cmb_style_mcq.jsonl` -- ShareGPT, single turn, no system: the human turn is
rendered exactly as the OpenCompass CMB prompt (`medllm.cmb.render_cmb_prompt`), every
item with freshly sampled distractors and option order. For single choice the gpt turn names
the correct option's text and then its letter (`肛门镜检查，D`: the letter is copied from the
option just named); for multiple choice, and where the option text has upper-case letters, it is
only the letter(s), e.g. `C` or `ABD`. OpenCompass keeps the upper-case characters of a reply, so
both score as the letter(s):

```json
{_ex(ex['mcq'])}
```

`finetune/option_letter_drills.jsonl` -- ShareGPT, single turn: an option list as in an MCQ and
a reply that gives every option's text with its letter, in random order (the text-to-letter
lookup that ends an MCQ reply, five times per example):

```json
{_ex(ex['drill'])}
```

## Preference data (DPO)

`reward/medical_dpo.jsonl` -- ShareGPT prompt turns (optional system, earlier human/gpt
turns, last turn is human) plus `chosen` / `rejected` strings. Text pairs reject facts of
another condition or unsafe advice; about half are CMB-prompt MCQs whose `chosen` is the
reply of `cmb_style_mcq.jsonl` and `rejected` a wrong letter, a wrong option's text and letter,
or the right text with a wrong letter:

```json
{_ex(ex['dpo'])}
```

```json
{_ex(ex['dpo_mcq'])}
```

`reward/medical_dpo_legacy.jsonl` -- legacy layout (`history` is a list of `[question, answer]` pairs):

```json
{_ex(ex['legacy'])}
```

## Tokenizer vocabulary

`vocab/medical_terms.txt` -- the knowledge table's terms (names, departments, symptoms,
checks, treatments, red flags), one a line. `python -m medllm.tiny --terms_file` keeps each
one a whole token wherever it stands (running text, an option after `A. `, a question), so
what PT and the dialogues teach about a term is about the same tokens the MCQ options use.
No stage trains on this file.

## CMB evaluation

`cmb/val.json` and `cmb/test.json` are JSON arrays in the CMB format used by OpenCompass's
`CMBDataset` (`option` texts are all longer than one character, since OpenCompass drops
1-character options; `answer` is the letter or sorted letters of the correct options;
about 85% 单项选择题, 15% 多项选择题, single-choice answers balanced over A-E):

```json
{_ex(ex['cmb'])}
```

The prompt sent to the model (see `medllm/cmb.py`) is

```text
{ex['cmb_prompt']}
```

and the reply is scored OpenCompass-style: the sorted set of upper-case characters in the
reply must equal `answer` (so `C. ACE抑制剂` is wrong, `C` is right).

### Held-out design

- `val.json` uses the TRAIN question phrasings (the same ones used in `finetune/cmb_style_mcq.jsonl`
  and `reward/`), with freshly sampled distractors and option orders.
- `test.json` asks about the same facts with HELD-OUT phrasings that never appear in
  `pretrain/`, `finetune/`, `reward/` or `vocab/` (checked by the generator and by the tests), so test
  accuracy measures learned knowledge rather than copied questions. Chance is 20% for
  single-choice items.

Train phrasings:
{tr}

Held-out phrasings (test only):
{ho}

Note: recent OpenCompass releases replace `answer` with `"NULL"` when loading the `test`
split of CMB; score `test.json` with `medllm.cmb.score_answer` or load it as the `val` split.
"""


def generate(output_dir: str, seed: int = 42) -> dict[str, str]:
    """Generate all files into ``output_dir``; return {relative path: text}."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    _validate_table()
    rng = random.Random(seed)

    txt, jl = build_pretrain(rng)
    convs = build_dialogues(rng)
    sharegpt = [to_sharegpt(t) for t in convs]
    openai = [to_openai(t) for t in build_dialogues(rng)[:150]]
    mcq_items = build_train_mcq(rng)
    mcq = [mcq_sharegpt(it) for it in mcq_items]
    drills = build_option_drills(rng)
    dpo, legacy = build_dpo(rng)
    eval_rng = random.Random(seed + 1)  # own stream: the eval sets do not move when training data changes
    val = build_eval(eval_rng, TRAIN_TEMPLATES)
    test = build_eval(eval_rng, HELDOUT_TEMPLATES)

    files = {
        "pretrain/encyclopedia.txt": "".join(t + "\n" for t in txt),
        "pretrain/encyclopedia.jsonl": _jsonl(jl),
        "finetune/medical_sharegpt.jsonl": _jsonl(sharegpt),
        "finetune/medical_openai.jsonl": _jsonl(openai),
        "finetune/cmb_style_mcq.jsonl": _jsonl(mcq),
        "finetune/option_letter_drills.jsonl": _jsonl(drills),
        "reward/medical_dpo.jsonl": _jsonl(dpo),
        "reward/medical_dpo_legacy.jsonl": _jsonl(legacy),
        "cmb/val.json": _json(val),
        "cmb/test.json": _json(test),
        "vocab/medical_terms.txt": "".join(t + "\n" for t in build_terms()),
    }
    counts = {
        "pretrain/encyclopedia.txt": len(txt), "pretrain/encyclopedia.jsonl": len(jl),
        "finetune/medical_sharegpt.jsonl": len(sharegpt), "finetune/medical_openai.jsonl": len(openai),
        "finetune/cmb_style_mcq.jsonl": len(mcq), "finetune/option_letter_drills.jsonl": len(drills),
        "reward/medical_dpo.jsonl": len(dpo),
        "reward/medical_dpo_legacy.jsonl": len(legacy), "cmb/val.json": len(val), "cmb/test.json": len(test),
        "vocab/medical_terms.txt": len(build_terms()),
    }

    # held-out guarantee: no test question nor held-out template fragment in training text
    train_text = "".join(v for k, v in files.items() if k.split("/")[0] in ("pretrain", "finetune", "reward", "vocab"))
    for frag in heldout_fragments():
        assert frag not in train_text, f"held-out fragment leaked into training data: {frag}"
    for it in test:
        assert it["question"] not in train_text, it["question"]

    multi_sg = next(r for r in sharegpt if len(r["conversations"]) >= 5)
    ex = {
        "txt": txt[0],
        "jsonl": jl[0],
        "sharegpt": multi_sg,
        "openai": openai[0],
        "mcq": mcq[0],
        "dpo": next(r for r in dpo if len(r["conversations"]) > 1),
        "dpo_mcq": next(r for r in dpo if r["conversations"][-1]["value"].startswith("以下是中国")
                        and not re.fullmatch(r"[A-E]+", r["chosen"])),
        "drill": drills[0],
        "legacy": next(r for r in legacy if r["history"]),
        "cmb": test[0],
        "cmb_prompt": _render_cmb_prompt(test[0]),
    }
    files["README.md"] = build_readme(seed, {k: v for k, v in files.items()}, counts, ex)

    for rel, text in files.items():
        path = os.path.join(output_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return files


def main(argv: list[str] | None = None) -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR)
    args = p.parse_args(argv)
    files = generate(args.output_dir, args.seed)
    for rel in sorted(files):
        print(f"{os.path.join(args.output_dir, rel)}: {len(files[rel].encode('utf-8')):,} bytes")


if __name__ == "__main__":
    main()

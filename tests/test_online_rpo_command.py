"""The online RPO driver hands its sampling settings to each iteration's sampler by command line:
the sampler's config, read back from that command, has every one of them (CPU only, no Aligner)."""

from dataclasses import fields

from nemo_plugins.aligner.online_rpo import OnlineRPOConfig, sample_command
from nemo_plugins.aligner.rpo_sample import SampleConfig, SamplingSettings
from nemo_plugins.config import load_config


def test_the_sampler_reads_back_every_sampling_setting(tmp_path):
    cfg = OnlineRPOConfig(policy="p.nemo", prompts="prompts.jsonl", work_dir=str(tmp_path), responses_per_prompt=6,
                          max_prompts=None, max_new_tokens=77, temperature=0.7, top_p=0.9, rm_host="rm-node",
                          rm_port=6000, rm_name="judge", launch="python")  # fmt: skip
    cmd = sample_command(cfg, "iter1/policy.nemo", tmp_path / "samples.jsonl")
    assert cmd[:3] == ["python", "-m", "nemo_plugins.aligner.rpo_sample"]
    sampler = load_config(SampleConfig, overrides=cmd[3:])
    for f in fields(SamplingSettings):
        assert getattr(sampler, f.name) == getattr(cfg, f.name), f.name
    assert (sampler.policy, sampler.prompts, sampler.out) == ("iter1/policy.nemo", "prompts.jsonl", str(tmp_path / "samples.jsonl"))
    torchrun = sample_command(OnlineRPOConfig(prompts="x.jsonl", max_prompts=5), "p", tmp_path)  # the default launch: torchrun
    capped = load_config(SampleConfig, overrides=torchrun[torchrun.index("nemo_plugins.aligner.rpo_sample") + 1 :])
    assert capped.max_prompts == 5

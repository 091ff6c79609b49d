"""FiftyOne operators of the CAM plugin: forms from the plugin's own
``forms`` module, work done by the :mod:`cam_plugin` library, used only
through its public API."""

import time

import fiftyone.operators as foo
import fiftyone.operators.types as types

# the library is an installed package (pyproject.toml, `make setup`): one
# copy, by its own name, whether it is used from Python or from the App
import cam_plugin

# FiftyOne loads this file as a package whose search path is the plugin's
# directory, so the plugin's own modules import relatively
from . import forms

_PROGRESS_EVERY_S = 0.5


def _delegation(ctx):
    # a sharded run is queued by an immediate execution, one delegated
    # operation per shard; otherwise Python callers ask with delegate=...
    # and App users choose in the App
    if int(ctx.params.get("num_shards") or 1) > 1 and ctx.params.get("shard") is None:
        return False
    delegate = ctx.params.get("delegate")
    return None if delegate is None else bool(delegate)


def _queues_shards(ctx):
    return int(ctx.params.get("num_shards") or 1) > 1 and ctx.params.get("shard") is None


class _Failed(Exception):
    """A run the library refused, with the one sentence that says why."""


def _attempt(ctx, call, *args, **kwargs):
    """Calls the library; its refusals (bad input, a conflicting run, a
    missing field) become :class:`_Failed` with their message, which the
    operator shows as one sentence instead of a traceback. A delegated
    operation lets them through, so the operation is marked failed with
    the message."""
    try:
        return call(*args, **kwargs)
    except (ValueError, OSError) as e:
        if ctx.delegated:
            raise
        raise _Failed(str(e)) from e


def _error_output(ctx, message):
    ctx.ops.notify(message, variant="error")
    return {"error": message}


def _error_property(outputs):
    # the sentence alone: what was refused and what to do
    outputs.str("error", label="Not done", view=types.MarkdownView())


def _add_run_outputs(outputs, summary):
    """The output fields of a run summary: counts always, failure reasons
    and queued shards only when there are some."""
    outputs.str("ran_on", label="Ran on")
    outputs.str("run_key", label="Run key")
    outputs.str("status", label="Run status")
    outputs.int("processed", label="Samples processed")
    outputs.int("failed", label="Samples failed")
    outputs.int("skipped", label="Samples already done")
    if summary and summary.get("warnings"):
        outputs.list("warnings", types.String(), label="Warnings")
    if summary and summary.get("errors"):
        table = types.TableView()
        table.add_column("reason", label="Reason")
        table.add_column("samples", label="Samples")
        outputs.list("failure_reasons", types.Object(), label="Failure reasons", view=table)
    if summary and summary.get("queued"):
        outputs.list("queued", types.String(), label="Queued delegated operations (one per shard)")


def _run_output(summary, label):
    outputs = types.Object()
    if summary and summary.get("error"):
        _error_property(outputs)
    else:
        _add_run_outputs(outputs, summary)
    return types.Property(outputs, view=types.View(label=label))


class _RunOperator(foo.Operator):
    """An operator that runs one of the library's runs: its form, its
    keyword arguments and its ``iter_compute_*`` function, run immediately
    (streaming progress when ``streams``) or as delegated shards."""

    name = label = description = done_label = None
    #: immediate runs stream progress to the App (long runs of a model)
    streams = False
    inputs_of = kwargs_of = steps_of = None  # staticmethods of subclasses

    @property
    def config(self):
        return foo.OperatorConfig(
            name=self.name,
            label=self.label,
            description=self.description,
            dynamic=True,
            execute_as_generator=self.streams,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def _call(self, sample_collection, params, delegate):
        ctx = dict(view=sample_collection.view())
        params = dict(params, delegate=delegate)
        return foo.execute_operator(self.uri, ctx, params=params, request_delegation=delegate)

    def resolve_input(self, ctx):
        inputs = types.Object()
        self.inputs_of(ctx, inputs)
        return types.Property(inputs, view=types.View(label=self.label))

    def resolve_delegation(self, ctx):
        return _delegation(ctx)

    def execute(self, ctx):
        samples = ctx.target_view()
        steps = self.steps_of(samples, delegate=_queues_shards(ctx), **self.kwargs_of(ctx.params))
        ran_on = forms.target_text(ctx, samples)
        if self.streams and not ctx.delegated:
            # immediate execution streams progress to the App as a generator
            return _stream_to_app(ctx, steps, ran_on, self.done_label)
        try:
            summary = _run_reporting(ctx, steps, ran_on)
        except _Failed as e:
            return _error_output(ctx, str(e))
        if not ctx.delegated:
            ctx.ops.reload_dataset()
        return summary

    def resolve_output(self, ctx):
        return _run_output(ctx.results, self.done_label)


class ComputeCams(_RunOperator):
    name = "compute_cams"
    label = "Compute class activation maps"
    description = "Predictions and heatmaps of where the model looks"
    done_label = "Class activation maps computed"
    streams = True
    inputs_of = staticmethod(forms.compute_cams_inputs)
    kwargs_of = staticmethod(forms.compute_cams_kwargs)
    steps_of = staticmethod(cam_plugin.iter_compute_cams)

    def __call__(self, sample_collection, model, delegate=False, **kwargs):
        """Runs the operator from Python.

        Args:
            sample_collection: a dataset or view
            model: a model specification string (see
                :func:`cam_plugin.compute_cams`)
            delegate (False): whether to queue the run for a delegated
                operation worker
            **kwargs: the form's parameters: ``method``, ``target_layer``,
                ``targets`` ("pred", "gt" or "both"), ``label_field``,
                ``pred_field``, ``heatmap_field``, ``batch_size``,
                ``device``, ``overwrite``
        """
        return self._call(sample_collection, dict(kwargs, model=str(model)), delegate)


class ComputeAttention(_RunOperator):
    name = "compute_attention"
    label = "Compute attention metrics"
    description = "How much of each heatmap falls on the labelled object"
    done_label = "Attention metrics computed"
    inputs_of = staticmethod(forms.compute_attention_inputs)
    kwargs_of = staticmethod(forms.compute_attention_kwargs)
    steps_of = staticmethod(cam_plugin.iter_compute_attention)

    def __call__(self, sample_collection, heatmap_field="cam", region_field=None, delegate=False, **kwargs):
        """Runs the operator from Python; ``kwargs``: ``region_classes``,
        ``tolerance``, ``border``, ``overwrite``."""
        params = dict(kwargs, heatmap_field=heatmap_field, region_field=region_field)
        return self._call(sample_collection, params, delegate)


class ComputeReliance(_RunOperator):
    name = "compute_reliance"
    label = "Test background reliance"
    description = (
        "Does the prediction survive without its object, or die without its background? "
        "Paints each over and asks the model again"
    )
    done_label = "Background reliance tested"
    streams = True
    inputs_of = staticmethod(forms.compute_reliance_inputs)
    kwargs_of = staticmethod(forms.compute_reliance_kwargs)
    steps_of = staticmethod(cam_plugin.iter_compute_reliance)

    def __call__(self, sample_collection, region_field, delegate=False, **kwargs):
        """Runs the operator from Python; ``kwargs``: ``pred_field``,
        ``region_classes``, ``fill``, ``prefix``, ``overwrite``, ``model``."""
        return self._call(sample_collection, dict(kwargs, region_field=region_field), delegate)


class ComputeContext(_RunOperator):
    name = "compute_context"
    label = "Name the attention by context labels"
    description = (
        "The share of each heatmap on each class of a segmentation or of the objects "
        "(grass, sky, road...)"
    )
    done_label = "Context shares computed"
    inputs_of = staticmethod(forms.compute_context_inputs)
    kwargs_of = staticmethod(forms.compute_context_kwargs)
    steps_of = staticmethod(cam_plugin.iter_compute_context)

    def __call__(self, sample_collection, heatmap_field="cam", context_field=None, delegate=False, **kwargs):
        """Runs the operator from Python; ``kwargs``: ``min_share``, ``overwrite``."""
        params = dict(kwargs, heatmap_field=heatmap_field, context_field=context_field)
        return self._call(sample_collection, params, delegate)


class DiscoverCues(_RunOperator):
    name = "discover_cues"
    label = "Discover the cues the model attends to"
    description = (
        "The places off the object the heatmaps light up, embedded with the model's own "
        "layer and grouped into recurring cues, each a saved view"
    )
    done_label = "Cues discovered"
    streams = True
    inputs_of = staticmethod(forms.discover_cues_inputs)
    kwargs_of = staticmethod(forms.discover_cues_kwargs)
    steps_of = staticmethod(cam_plugin.iter_discover_cues)

    def __call__(self, sample_collection, heatmap_field="cam", delegate=False, **kwargs):
        """Runs the operator from Python; ``kwargs``: ``region_field``,
        ``context_field``, ``num_groups``, ``min_share``, ``brain_key``,
        ``overwrite``."""
        params = dict(kwargs, heatmap_field=heatmap_field)
        return self._call(sample_collection, params, delegate)


class CuesPanel(foo.Panel):
    """The cue groups of a cue run, most mistakes first, each with its
    numbers and typical hotspots; a button opens its samples or its
    hotspot patches."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="cue_groups",
            label="Cues",
            surfaces="grid",
            help_markdown="The recurring places off the object that the heatmaps light up, "
            "grouped by what the model's layer sees there. Open a group to see its samples "
            "or its hotspots.",
        )

    def on_load(self, ctx):
        self._refresh(ctx)

    def on_change_dataset(self, ctx):
        self._refresh(ctx)

    def _refresh(self, ctx, field=None):
        fields = forms.cue_fields(ctx.dataset)
        field = field or ctx.panel.state.heatmap_field
        if field not in fields:
            field = fields[0] if fields else None
        ctx.panel.state.fields = fields
        ctx.panel.state.heatmap_field = field
        groups = cam_plugin.cue_groups(ctx.dataset, field) if field else []
        ctx.panel.state.groups = [
            {"group": g.group, "name": g.name, "view": g.view, "patches_view": g.patches_view,
             "text": forms.cue_group_markdown(g)}
            for g in groups
        ]

    def on_field_change(self, ctx):
        self._refresh(ctx, ctx.params.get("value"))

    def open_samples(self, ctx):
        name = ctx.params.get("view")
        if name in ctx.dataset.list_saved_views():
            ctx.ops.set_view(name=name)

    def render(self, ctx):
        panel = types.Object()
        fields = ctx.panel.state.fields or []
        if not fields:
            panel.md(
                "No cues yet. Run **Discover the cues the model attends to** on a heatmap "
                "field of **Compute class activation maps**.",
                name="empty",
            )
            return types.Property(panel)
        if len(fields) > 1:
            _heatmap_field_dropdown(panel, fields, ctx.panel.state.heatmap_field, self.on_field_change)
        groups = ctx.panel.state.groups or []
        if not groups:
            panel.md("The cue run has not grouped its hotspots yet: some samples are still to do.",
                     name="ungrouped")
        for g in groups:
            panel.md(g["text"], name=f"group_{g['group']}")
            buttons = panel.h_stack(f"open_{g['group']}", gap=1)
            buttons.btn(f"samples_{g['group']}", label="Show its samples", variant="outlined",
                        on_click=self.open_samples, params={"view": g["view"]})
            buttons.btn(f"patches_{g['group']}", label="Show its hotspots", variant="outlined",
                        on_click=self.open_samples, params={"view": g["patches_view"]})
        return types.Property(panel, view=types.GridView(orientation="vertical", align_x="stretch", gap=2))


class AttentionViews(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="attention_views",
            label="Find where the model looked at the wrong place",
            description="Saved views: misclassified with attention on the background, ...",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, heatmap_field="cam", **kwargs):
        """Runs the operator from Python; ``kwargs``: the thresholds
        (``background_focus``, ``object_focus``, ``max_object_area``,
        ``confidence``) and ``open_view``."""
        params = dict(kwargs, heatmap_field=heatmap_field)
        return foo.execute_operator(self.uri, dict(view=sample_collection.view()), params=params)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Find these samples in")
        field = forms.heatmap_field_input(ctx, inputs, ctx.target_view(), with_metrics=True)
        if field:
            forms.threshold_inputs(inputs, views=forms.view_names(ctx.target_view(), field))
        return types.Property(inputs, view=types.View(label="Attention views"))

    def execute(self, ctx):
        heatmap_field = ctx.params.get("heatmap_field", "cam")
        samples = ctx.target_view()
        try:
            views = _attempt(
                ctx, cam_plugin.attention_views, samples, heatmap_field, **forms.thresholds_from(ctx.params)
            )
        except _Failed as e:
            return _error_output(ctx, str(e))
        opened = ctx.params.get("open_view") or "misclassified_background"
        if opened not in views:
            # a field without ground truth has only the views that need none
            opened = next(iter(views))
        ctx.ops.set_view(name=cam_plugin.saved_view_name(heatmap_field, opened))
        counts = [
            {"view": cam_plugin.saved_view_name(heatmap_field, name), "samples": view.count()}
            for name, view in views.items()
        ]
        return {"ran_on": forms.target_text(ctx, samples), "counts": counts, "opened": opened}

    def resolve_output(self, ctx):
        outputs = types.Object()
        if (ctx.results or {}).get("error"):
            _error_property(outputs)
        else:
            outputs.str("ran_on", label="Ran on")
            outputs.str("opened", label="Opened view")
            table = types.TableView()
            table.add_column("view", label="Saved view")
            table.add_column("samples", label="Samples")
            outputs.list("counts", types.Object(), label="Samples per view", view=table)
        return types.Property(outputs, view=types.View(label="Attention views saved"))


class ClassSummary(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="class_attention_summary",
            label="Which classes look at the background",
            description="Classes ranked by how often their attention falls off the object",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, heatmap_field="cam", **kwargs):
        params = dict(kwargs, heatmap_field=heatmap_field)
        return foo.execute_operator(self.uri, dict(view=sample_collection.view()), params=params)

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx, action_description="Summarise")
        if forms.heatmap_field_input(ctx, inputs, ctx.target_view(), with_metrics=True, for_summary=True):
            forms.threshold_inputs(inputs, with_views=False)
        return types.Property(inputs, view=types.View(label="Per-class attention summary"))

    def execute(self, ctx):
        heatmap_field = ctx.params.get("heatmap_field", "cam")
        samples = ctx.target_view()
        try:
            rows = _attempt(
                ctx, cam_plugin.class_summary, samples, heatmap_field,
                **forms.summary_thresholds_from(ctx.params),
            )
        except _Failed as e:
            return _error_output(ctx, str(e))
        ran_on = forms.target_text(ctx, samples)
        return {
            "ran_on": ran_on,
            "note": forms.summary_note(rows, heatmap_field, ran_on),
            "rows": forms.summary_rows_for_display(rows),
            "plot": forms.summary_traces(rows),
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        if (ctx.results or {}).get("error"):
            _error_property(outputs)
            return types.Property(outputs, view=types.View(label="Per-class attention summary"))
        outputs.str("ran_on", label="Ran on")
        outputs.str("note", view=types.MarkdownView())
        outputs.plot(
            "plot",
            label="Share of samples looking off the object",
            layout=forms.SUMMARY_PLOT_LAYOUT,
            config={"displayModeBar": False},
        )
        table = types.TableView()
        for key, label in forms.SUMMARY_COLUMNS:
            table.add_column(key, label=label)
        outputs.list("rows", types.Object(), label="Classes", view=table)
        return types.Property(outputs, view=types.View(label="Per-class attention summary"))


class AttentionByClassPanel(foo.Panel):
    """The per-class summary as a bar chart; a bar opens that class's
    samples whose attention is off the object."""

    @property
    def config(self):
        return foo.PanelConfig(
            name="attention_by_class",
            label="Attention by class",
            surfaces="grid",
            help_markdown="Classes ranked by the share of their samples whose "
            "class activation map falls off the labelled object. Click a bar to "
            "see those samples.",
        )

    def on_load(self, ctx):
        self._refresh(ctx)

    def on_change_dataset(self, ctx):
        self._refresh(ctx)

    def on_change_view(self, ctx):
        if ctx.panel.state.target == "view":
            self._refresh(ctx)

    def _samples(self, ctx):
        # the current view only when the user chose it and there is one
        if ctx.panel.state.target == "view" and ctx.has_custom_view:
            return ctx.view, "the current view"
        return ctx.dataset, "the whole dataset"

    def _refresh(self, ctx, field=None):
        samples, target = self._samples(ctx)
        fields, problems = forms.usable_attention_fields(samples)
        field = field or ctx.panel.state.heatmap_field
        if field not in fields:
            field = fields[0] if fields else None
        ctx.panel.state.heatmap_field = field
        ctx.panel.state.fields = fields
        ctx.panel.state.problems = problems
        rows = cam_plugin.class_summary(samples, field) if field else []
        n = samples.count()
        ran_on = f"{target} ({n} sample{'s' if n != 1 else ''})"
        ctx.panel.state.note = forms.summary_note(rows, field, ran_on) if field else None
        ctx.panel.data.summary = forms.summary_traces(rows)

        # beside it, what the model relies on, where those runs exist
        prefix = cam_plugin.views.reliance_prefix(samples, field) if field else None
        ctx.panel.state.reliance_prefix = prefix
        reliance = cam_plugin.reliance_summary(samples, prefix) if prefix else []
        ctx.panel.state.reliance_note = forms.reliance_note(reliance, prefix) if reliance else None
        ctx.panel.data.reliance = forms.reliance_traces(reliance)
        context = forms.panel_context_summary(samples, field) if field else []
        ctx.panel.state.context_note = forms.context_note(context, field) if context else None
        ctx.panel.data.context = forms.context_traces(context)

    def on_field_change(self, ctx):
        self._refresh(ctx, ctx.params.get("value"))

    def on_target_change(self, ctx):
        ctx.panel.state.target = ctx.params.get("value") or "dataset"
        self._refresh(ctx)

    def on_click(self, ctx):
        field = ctx.panel.state.heatmap_field
        class_name = ctx.params.get("x") or ctx.params.get("id")
        if field and class_name:
            samples, _ = self._samples(ctx)
            view = cam_plugin.class_view(samples, class_name, field)
            ctx.ops.set_view(view=view)

    def on_reliance_click(self, ctx):
        prefix = ctx.panel.state.reliance_prefix
        class_name = ctx.params.get("x") or ctx.params.get("id")
        if prefix and class_name:
            samples, _ = self._samples(ctx)
            ctx.ops.set_view(view=cam_plugin.reliance_view(samples, class_name, prefix))

    def on_context_click(self, ctx):
        field = ctx.panel.state.heatmap_field
        context_class, class_name = ctx.params.get("x"), ctx.params.get("y")
        if field and context_class and class_name:
            samples, _ = self._samples(ctx)
            by = forms.context_grouping(samples, field)
            ctx.ops.set_view(view=cam_plugin.context_view(samples, class_name, context_class, field, by=by))

    def render(self, ctx):
        panel = types.Object()
        if ctx.has_custom_view or ctx.panel.state.target == "view":
            targets = types.RadioGroup(orientation="horizontal")
            targets.add_choice("dataset", label="Whole dataset")
            targets.add_choice("view", label="Current view")
            panel.enum(
                "target",
                targets.values(),
                default=ctx.panel.state.target or "dataset",
                label="Samples",
                view=targets,
                on_change=self.on_target_change,
            )

        fields = ctx.panel.state.fields or []
        if not fields:
            problems = ctx.panel.state.problems or []
            text = (
                "No heatmap field can be summarised yet:\n\n"
                + "\n".join(f"- {p}" for p in problems)
                if problems
                else "No heatmap field has attention metrics yet. Run **Compute class "
                "activation maps** with a ground-truth field, then **Compute "
                "attention metrics** with the objects' boxes, polygons or masks."
            )
            panel.md(text, name="empty")
            return types.Property(panel)

        _heatmap_field_dropdown(panel, fields, ctx.panel.state.heatmap_field, self.on_field_change)
        panel.plot(
            "summary",
            layout=forms.SUMMARY_PLOT_LAYOUT,
            on_click=self.on_click,
            config={"displayModeBar": False, "responsive": True},
        )
        if ctx.panel.state.note:
            panel.md(ctx.panel.state.note, name="note")
        if ctx.panel.state.problems:
            panel.md(
                "Not offered: " + "; ".join(ctx.panel.state.problems), name="not_offered"
            )
        if ctx.panel.state.reliance_note:
            panel.plot(
                "reliance",
                layout=forms.RELIANCE_PLOT_LAYOUT,
                on_click=self.on_reliance_click,
                config={"displayModeBar": False, "responsive": True},
            )
            panel.md(ctx.panel.state.reliance_note, name="reliance_note")
        if ctx.panel.state.context_note:
            panel.plot(
                "context",
                layout=forms.CONTEXT_MATRIX_LAYOUT,
                on_click=self.on_context_click,
                config={"displayModeBar": False, "responsive": True},
            )
            panel.md(ctx.panel.state.context_note, name="context_note")
        # the App lays a vertical GridView out as a CSS grid whose column is
        # as wide as its content unless stretched; a plot has no content
        # width of its own
        return types.Property(
            panel, view=types.GridView(orientation="vertical", align_x="stretch", gap=2)
        )


def _heatmap_field_dropdown(panel, fields, default, on_change):
    choices = types.DropdownView()
    for name in fields:
        choices.add_choice(name, label=name)
    panel.enum(
        "heatmap_field", choices.values(), default=default, label="Heatmap field", view=choices, on_change=on_change
    )


class ListRuns(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="list_cam_runs",
            label="Manage CAM runs: list",
            description="The plugin's runs on this dataset with their configuration",
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def execute(self, ctx):
        rows = forms.run_rows(ctx.dataset)
        return {
            "ran_on": f"dataset '{ctx.dataset.name}' (runs belong to the dataset)",
            "runs": rows,
            "owned": rows,
            "files": [r for r in rows if r["files_dir"] != "-"],
        }

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("ran_on", label="Runs of")
        table = types.TableView()
        for key, label in forms.RUN_COLUMNS:
            table.add_column(key, label=label)
        outputs.list("runs", types.Object(), label="Runs", view=table)
        owned = types.TableView()
        for key, label in forms.RUN_FIELD_COLUMNS:
            owned.add_column(key, label=label)
        outputs.list("owned", types.Object(), label="What each run computed and owns", view=owned)
        files = types.TableView()
        for key, label in forms.RUN_FILES_COLUMNS:
            files.add_column(key, label=label)
        outputs.list("files", types.Object(), label="Where the heatmap files are", view=files)
        return types.Property(outputs, view=types.View(label="CAM runs"))


class DeleteRun(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="delete_cam_run",
            label="Manage CAM runs: delete",
            description="Deletes a run with its fields and heatmap files",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
        )

    def __call__(self, sample_collection, run_key):
        params = dict(run_key=run_key)
        return foo.execute_operator(self.uri, dict(dataset=sample_collection._dataset), params=params)

    def resolve_input(self, ctx):
        inputs = types.Object()
        forms.delete_run_inputs(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Delete a CAM run"))

    def execute(self, ctx):
        key = ctx.params["run_key"]
        try:
            _attempt(ctx, cam_plugin.delete_run, ctx.dataset, key)
        except _Failed as e:
            return _error_output(ctx, str(e))
        ctx.ops.reload_dataset()
        return {"deleted": key}

    def resolve_output(self, ctx):
        outputs = types.Object()
        if (ctx.results or {}).get("error"):
            _error_property(outputs)
        else:
            outputs.str("deleted", label="Deleted run")
        return types.Property(outputs, view=types.View(label="CAM run deleted"))


def _run_reporting(ctx, steps, ran_on):
    """Drains a run's steps, reporting progress to a delegated operation or
    an immediate one that is not a generator; returns its summary dict."""
    summary = None
    for update in _progress_updates(_attempt_steps(ctx, steps), ran_on):
        if isinstance(update, dict):
            summary = update
        elif ctx.delegated:
            ctx.set_progress(progress=update[0], label=update[1])
    return summary


def _stream_to_app(ctx, steps, ran_on, label):
    summary = None
    try:
        for update in _progress_updates(_attempt_steps(ctx, steps), ran_on):
            if isinstance(update, dict):
                summary = update
            else:
                yield ctx.ops.set_progress(progress=update[0], label=update[1])
    except _Failed as e:
        summary = {"error": str(e)}
        yield ctx.ops.notify(str(e), variant="error")
    else:
        yield ctx.ops.reload_dataset()
    yield ctx.ops.show_output(_run_output(summary, label).to_json(), summary)


def _attempt_steps(ctx, steps):
    """A run's steps, with the library's refusals as :class:`_Failed`."""
    while True:
        try:
            step = next(steps)
        except StopIteration as stop:
            return stop.value
        except (ValueError, OSError) as e:
            if ctx.delegated:
                raise
            raise _Failed(str(e)) from e
        yield step


def _progress_updates(steps, ran_on):
    """Throttled ``(fraction, label)`` progress updates of a run's steps,
    then its summary as a dict."""
    last = 0.0
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            summary = stop.value
            break
        if time.monotonic() - last >= _PROGRESS_EVERY_S:
            last = time.monotonic()
            yield done / max(total, 1), f"{done} of {total} samples"

    reasons = summary.errors or {}
    yield {
        "ran_on": ran_on,
        "run_key": summary.key,
        "processed": summary.processed,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "status": summary.status,
        "errors": reasons,
        "failure_reasons": [{"reason": r, "samples": n} for r, n in reasons.items()],
        "queued": summary.queued,
        "warnings": list(getattr(summary, "warnings", None) or []),
    }


def register(p):
    p.register(ComputeCams)
    p.register(ComputeAttention)
    p.register(ComputeReliance)
    p.register(ComputeContext)
    p.register(DiscoverCues)
    p.register(CuesPanel)
    p.register(AttentionViews)
    p.register(ClassSummary)
    p.register(AttentionByClassPanel)
    p.register(ListRuns)
    p.register(DeleteRun)
